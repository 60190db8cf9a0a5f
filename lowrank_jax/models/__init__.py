"""Small pure-function models whose dense layers multiply through :func:`lowrank_jax.dot`:
BERT, and decoders of the Llama, Mistral, Qwen, Gemma and MoE families with their
Hugging Face folders (:func:`load_pretrained` / :func:`save_pretrained`)."""

from lowrank_jax.models.bert import (BertConfig, bert_forward, classifier_logits, init_bert,
                                     init_classifier, load_minilm, mean_pool, sentence_embedding)
from lowrank_jax.models.decoder import (DecoderConfig, RopeScaling, decoder_forward, decoder_hidden,
                                        decoder_param_count, init_decoder)
from lowrank_jax.models.hf_decoder import checkpoint_plan, load_pretrained, save_pretrained
from lowrank_jax.models.llama import LlamaConfig, init_llama, llama_forward, llama_param_count
