"""The memory plan: model shapes from config.json, per-process memory estimates, node types, the fit check."""
