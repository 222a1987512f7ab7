"""loading stage"""
