"""airoboros.inference"""
