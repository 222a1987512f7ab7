"""config stage"""
