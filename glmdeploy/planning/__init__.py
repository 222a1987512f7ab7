"""planning stage"""
