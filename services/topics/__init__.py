"""airoboros.topics"""
