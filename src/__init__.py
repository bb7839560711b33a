"""Multitask LoRA composition: per-task adapters, merges, Mixture-of-LoRAs, evaluation.

"The study", wherever this package says it, is the reference study the toolkit reproduces: a UNIST
thesis that trained one LoRA per task on Qwen2-0.5B and Qwen2-1.5B, combined them with a trained
Mixture-of-LoRAs router and with router-free merges (concatenation, weight summing, SVD), and scored
each against the oracle on 5 and 7 tasks; "its code" is that study's own code, whose protocol
(`--scoring study`) and decoding (`moa_study`) the toolkit keeps beside its own. Every other paper is
named where its method is (docs/compose.md lists them).
"""
