"""Small pure-function models whose dense layers multiply through :func:`lowrank_jax.dot`."""

from lowrank_jax.models.bert import (BertConfig, bert_forward, classifier_logits, init_bert,
                                     init_classifier, load_minilm, mean_pool, sentence_embedding)
from lowrank_jax.models.llama import LlamaConfig, init_llama, llama_forward, llama_param_count
