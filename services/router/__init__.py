"""airoboros.router"""
