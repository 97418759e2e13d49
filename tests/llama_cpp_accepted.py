"""What llama.cpp accepts in a GGUF, copied as data from its source, for tests that run without llama.cpp.

From llama.cpp 0c1e57098bba43ac29e6e3b677cdceebdd22334f, the copy llama-cpp-python 0.3.36 vendors
(`vendor/llama.cpp` in its source package). Copy again from the new source when the pinned version changes.
"""

LLAMA_CPP_VERSION = "llama.cpp 0c1e570 (llama-cpp-python 0.3.36)"

# src/llama-vocab.cpp, llama_vocab::impl::load: every `tokenizer.ggml.pre` a byte-level BPE ("gpt2") vocabulary may
# name; any other name ends in "unknown pre-tokenizer type" and the model does not load.
PRE_TOKENIZER_NAMES = {
    "default", "minicpm5", "llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
    "jina-v5-nano", "deepseek-llm", "deepseek-coder", "deepseek-v3", "spark2_5", "youtu", "falcon", "mpt",
    "starcoder", "gpt-2", "phi-2", "jina-es", "jina-de", "gigachat", "jina-v2-es", "jina-v2-de", "a.x-4.0",
    "mellum", "modern-bert", "jais-2", "gemma4", "granite-embed-multi-311m", "sarvam-moe", "jina-v1-en",
    "jina-v2-code", "roberta-bpe", "whitespace", "refact", "command-r", "qwen2", "deepseek-r1-qwen", "kormo",
    "f2llmv2", "qwen35", "stablelm2", "olmo", "dbrx", "smaug-bpe", "poro-chat", "chatglm-bpe", "glm4", "glm5",
    "viking", "jais", "tekken", "smollm", "codeshell", "bloom", "gpt3-finnish", "exaone", "exaone4", "exaone-moe",
    "chameleon", "minerva-7b", "megrez", "gpt-4o", "llama4", "kanana2", "talkie", "granite-embed-multi-97m",
    "tiny_aya", "cohere2moe", "superbpe", "trillion", "granite-docling", "bailingmoe", "bailingmoe2", "llada-moe",
    "seed-coder", "hunyuan", "hunyuan-dense", "hy_v4", "joyai-llm", "kimi-k2", "ufakzeka", "grok-2", "afmoe",
    "laguna", "minimax-m2", "solar-open", "mellum2"
}

# src/llama-arch.cpp, LLM_KV_NAMES: every metadata key llama.cpp reads ("%s" is the architecture).
METADATA_KEYS = {
    "general.type", "general.architecture", "general.quantization_version", "general.alignment",
    "general.file_type", "general.sampling.sequence", "general.sampling.top_k", "general.sampling.top_p",
    "general.sampling.min_p", "general.sampling.xtc_probability", "general.sampling.xtc_threshold",
    "general.sampling.temp", "general.sampling.penalty_last_n", "general.sampling.penalty_repeat",
    "general.sampling.mirostat", "general.sampling.mirostat_tau", "general.sampling.mirostat_eta", "general.name",
    "general.author", "general.version", "general.url", "general.description", "general.license",
    "general.source.url", "general.source.huggingface.repository", "general.tensor_extra.name",
    "general.tensor_extra.prec_a4", "%s.vocab_size", "%s.context_length", "%s.embedding_length",
    "%s.embedding_length_out", "%s.embedding_length_per_layer_input", "%s.features_length", "%s.block_count",
    "%s.leading_dense_block_count", "%s.attn_res.block_size", "%s.activation.situ_beta",
    "%s.activation.situ_linear_beta", "%s.feed_forward_length", "%s.expert_feed_forward_length",
    "%s.expert_shared_feed_forward_length", "%s.expert_chunk_feed_forward_length", "%s.swiglu_clamp_exp",
    "%s.swiglu_clamp_shexp", "%s.use_parallel_residual", "%s.tensor_data_layout", "%s.expert_count",
    "%s.expert_used_count", "%s.expert_shared_count", "%s.expert_group_count", "%s.expert_group_used_count",
    "%s.expert_weights_scale", "%s.expert_weights_norm", "%s.expert_latent_length", "%s.expert_gating_func",
    "%s.expert_group_scale", "%s.experts_per_group", "%s.moe_every_n_layers", "%s.moe_latent_size",
    "%s.nextn_predict_layers", "%s.n_deepstack_layers", "%s.deepstack_mapping", "%s.hidden_activation",
    "%s.pooling_type", "%s.logit_scale", "%s.decoder_start_token_id", "%s.decoder_block_count",
    "%s.attn_logit_softcapping", "%s.router_logit_softcapping", "%s.final_logit_softcapping", "%s.swin_norm",
    "%s.rescale_every_n_layers", "%s.time_mix_extra_dim", "%s.time_decay_extra_dim", "%s.residual_scale",
    "%s.embedding_scale", "%s.adapters.count", "%s.adapters.token_ids_activate", "%s.adapters.token_ids_substitute",
    "%s.adapters.lora_rank", "%s.adapters.router_gain", "%s.token_shift_count", "%s.interleave_moe_layer_step",
    "%s.full_attention_interval", "%s.num_loops", "%s.skip_loop_final_norm", "%s.hrm.layers_per_stack",
    "%s.hrm.h_cycles", "%s.hrm.l_cycles", "%s.hrm.prefix_lm", "%s.attention.head_count",
    "%s.attention.head_count_kv", "%s.attention.max_alibi_bias", "%s.attention.clamp_kqv",
    "%s.attention.key_length", "%s.attention.value_length", "%s.attention.layer_norm_epsilon",
    "%s.attention.layer_norm_rms_epsilon", "%s.attention.group_norm_epsilon", "%s.attention.group_norm_groups",
    "%s.attention.causal", "%s.attention.q_lora_rank", "%s.attention.kv_lora_rank", "%s.attention.decay_lora_rank",
    "%s.attention.iclr_lora_rank", "%s.attention.value_residual_mix_lora_rank", "%s.attention.gate_lora_rank",
    "%s.attention.relative_buckets_count", "%s.attention.sliding_window", "%s.attention.sliding_window_pattern",
    "%s.attention.rope_pattern", "%s.attention.scale", "%s.attention.output_scale", "%s.attention.value_scale",
    "%s.attention.temperature_length", "%s.attention.temperature_scale", "%s.attention.key_length_mla",
    "%s.attention.value_length_mla", "%s.attention.key_length_swa", "%s.attention.value_length_swa",
    "%s.attention.key_length_mla_swa", "%s.attention.value_length_mla_swa", "%s.attention.kv_lora_rank_swa",
    "%s.attention.indexer.head_count", "%s.attention.indexer.key_length", "%s.attention.indexer.top_k",
    "%s.attention.indexer.block_size", "%s.attention.indexer.local_blocks", "%s.attention.indexer.types",
    "%s.attention.indexer.kpool", "%s.attention.indexer.kpool_select_tail", "%s.attention.output_group_count",
    "%s.attention.output_lora_rank", "%s.attention.compress_rope_freq_base", "%s.attention.compress_ratios",
    "%s.attention.shared_kv_layers", "%s.attention.recurrent_layers", "%s.hyper_connection.count",
    "%s.hyper_connection.sinkhorn_iterations", "%s.hyper_connection.epsilon", "%s.hyper_connection.magnitude",
    "%s.hyper_connection.low_rank", "%s.ple.layers", "%s.ple.ngram_size", "%s.ple.heads_per_ngram",
    "%s.ple.conv_kernel", "%s.ple.layer_multipliers", "%s.ple.head_offsets", "%s.ple.head_vocab_sizes",
    "%s.ple.eos_token_id", "%s.ple.image_token_id", "%s.hash_layer_count", "%s.rope.dimension_count",
    "%s.rope.dimension_count_swa", "%s.rope.dimension_sections", "%s.rope.freq_base", "%s.rope.freq_base_swa",
    "%s.rope.scale_linear", "%s.rope.scaling.type", "%s.rope.scaling.factor", "%s.rope.scaling.alpha",
    "%s.rope.scaling.attn_factor", "%s.rope.scaling.original_context_length", "%s.rope.scaling.finetuned",
    "%s.rope.scaling.yarn_log_multiplier", "%s.rope.scaling.yarn_ext_factor", "%s.rope.scaling.yarn_attn_factor",
    "%s.rope.scaling.yarn_beta_fast", "%s.rope.scaling.yarn_beta_slow", "split.no", "split.count",
    "split.tensors.count", "%s.ssm.conv_kernel", "%s.ssm.inner_size", "%s.ssm.state_size", "%s.ssm.time_step_rank",
    "%s.ssm.group_count", "%s.ssm.dt_b_c_rms", "%s.kda.head_dim", "%s.kda.safe_gate", "%s.kda.gate_lower_bound",
    "%s.wkv.head_size", "%s.posnet.embedding_length", "%s.posnet.block_count", "%s.convnext.embedding_length",
    "%s.convnext.block_count", "%s.classifier.output_labels", "%s.classifier.pooling_type", "%s.target_layers",
    "%s.target_hidden_size", "%s.norm_before_residual", "%s.norm_before_fc", "%s.block_size", "%s.conv_kernel_size",
    "%s.conv_group_size", "%s.selector_rank", "%s.selector_top_k", "%s.shortconv.l_cache", "%s.dense_2_feat_in",
    "%s.dense_2_feat_out", "%s.dense_3_feat_in", "%s.dense_3_feat_out", "tokenizer.ggml.model",
    "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.token_type_count",
    "tokenizer.ggml.scores", "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id", "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.seperator_token_id", "tokenizer.ggml.padding_token_id", "tokenizer.ggml.cls_token_id",
    "tokenizer.ggml.mask_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token",
    "tokenizer.ggml.add_sep_token", "tokenizer.ggml.add_space_prefix", "tokenizer.ggml.remove_extra_whitespaces",
    "tokenizer.ggml.precompiled_charsmap", "tokenizer.huggingface.json", "tokenizer.rwkv.world",
    "tokenizer.chat_template", "tokenizer.ggml.normalizer.lowercase", "tokenizer.ggml.normalizer.strip_accents",
    "tokenizer.ggml.fim_pre_token_id", "tokenizer.ggml.fim_suf_token_id", "tokenizer.ggml.fim_mid_token_id",
    "tokenizer.ggml.fim_pad_token_id", "tokenizer.ggml.fim_rep_token_id", "tokenizer.ggml.fim_sep_token_id",
    "tokenizer.ggml.suppress_tokens", "adapter.type", "adapter.lora.alpha", "adapter.lora.task_name",
    "adapter.lora.prompt_prefix", "adapter.alora.invocation_tokens", "xielu.alpha_n", "xielu.alpha_p", "xielu.beta",
    "xielu.eps", "tokenizer.ggml.prefix_token_id", "tokenizer.ggml.suffix_token_id",
    "tokenizer.ggml.middle_token_id"
}

# src/models/{llama,qwen2,qwen3}.cpp, load_arch_tensors: the tensors each architecture loads, as
# name -> (shape as GGUF stores it, innermost dimension first; loading fails without it). The file may hold no other
# tensor ("wrong number of tensors"). Shapes name hyper-parameters: E embedding_length, V the token count,
# F feed_forward_length, Q head_count * key_length, K head_count_kv * key_length, D key_length, R rope dimensions / 2.
_BLOCK = {
    "attn_norm.weight": (("E",), True), "attn_q.weight": (("E", "Q"), True), "attn_k.weight": (("E", "K"), True),
    "attn_v.weight": (("E", "K"), True), "attn_q.bias": (("Q",), False), "attn_k.bias": (("K",), False),
    "attn_v.bias": (("K",), False), "attn_output.weight": (("Q", "E"), True), "ffn_norm.weight": (("E",), True),
    "ffn_gate.weight": (("E", "F"), True), "ffn_down.weight": (("F", "E"), True), "ffn_up.weight": (("E", "F"), True),
}
_MODEL = {"token_embd.weight": (("E", "V"), True), "output_norm.weight": (("E",), True),
          "output.weight": (("E", "V"), False)}
TENSORS = {
    "llama": {
        "model": {**_MODEL, "rope_freqs.weight": (("R",), False)},
        "block": {**_BLOCK, "attn_output.bias": (("E",), False), "ffn_gate.bias": (("F",), False),
                  "ffn_down.bias": (("E",), False), "ffn_up.bias": (("F",), False)},
    },
    "qwen2": {
        "model": {**_MODEL, "output.bias": (("V",), False)},
        # qwen2 sizes q and the output projection by embedding_length, not by head_count * key_length
        "block": {**_BLOCK, "attn_q.weight": (("E", "E"), True), "attn_q.bias": (("E",), False),
                  "attn_output.weight": (("E", "E"), True)},
    },
    "qwen3": {
        "model": _MODEL,
        "block": {**_BLOCK, "attn_q_norm.weight": (("D",), True), "attn_k_norm.weight": (("D",), True)},
    },
}
