"""inference stage"""
