"""GPT model (GPT-2 and Llama styles) built from tensor-parallel layers."""
from megatron_lite.models.gpt.mlp import MLP
from megatron_lite.models.gpt.model import GPTModel, LanguageModelEmbedding
from megatron_lite.models.gpt.transformer import Norm, SelfAttention, TransformerBlock, TransformerLayer

__all__ = ["GPTModel", "LanguageModelEmbedding", "TransformerBlock", "TransformerLayer", "SelfAttention", "MLP", "Norm"]
