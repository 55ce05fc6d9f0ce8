"""What the service runs: settings, predictor, decision policy, TFLite runner, uploads, monitoring
records, the model card page. Imports nothing from data, training, release or ops.
"""
