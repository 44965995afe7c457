"""airoboros.generator"""
