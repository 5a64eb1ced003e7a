from distft.models.loading import choose_attn_implementation, load_model, load_tokenizer

__all__ = ["choose_attn_implementation", "load_model", "load_tokenizer"]
