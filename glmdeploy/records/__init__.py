"""records stage"""
