"""Multitask LoRA composition: per-task adapters, merges, Mixture-of-LoRAs, evaluation."""
