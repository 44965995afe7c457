"""airoboros.dedupe"""
