"""What every layer shares: the composed config, output paths, photo decoding, temperature scaling.
"""
