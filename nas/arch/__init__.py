"""Architectures as data: specs, blocks, the backbone builder, cost counting and the MobileNet zoo."""
