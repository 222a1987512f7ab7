"""hardware stage"""
