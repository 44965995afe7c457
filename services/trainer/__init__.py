"""airoboros.trainer"""
