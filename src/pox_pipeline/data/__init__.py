"""The data stages: synthesize the embedded default set, prepare a raw collection into leak-free
splits.
"""
