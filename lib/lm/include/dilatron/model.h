// The decoder-only transformer LM: byte embedding, pre-LayerNorm blocks of dilated multi-head
// attention (fused qkv projection, output projection) and a GELU MLP, final LayerNorm, output head
// tied to the embedding (or its own Linear).
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "dilatron/attention.h"
#include "dilatron/data.h"
#include "dilatron/nn.h"
#include "dilatron/random.h"

namespace dilatron {

using Schedule = std::vector<AttentionBranch>;

struct ModelConfig {
  int64_t vocab_size = data::vocab_size();  // bytes + BOS/EOS/PAD
  int64_t seq_len = 2048;    // training context
  int64_t d_model = 128;
  int64_t n_layers = 4;
  int64_t n_heads = 8;
  int64_t d_ff = 512;
  double dropout = 0.0;       // embeddings and residual branches
  double attn_dropout = 0.0;  // attention probabilities (inside the op)
  std::string positional = "xpos";  // none | rotary | xpos
  double xpos_scale_base = 512.0;
  bool rel_pos_bias = false;
  int64_t bias_buckets = 32;
  int64_t bias_max_distance = 128;
  bool tie_embeddings = true;
  double init_std = 0.02;
  std::vector<Schedule> layer_schedules;  // one per layer, each covering every (t, h)
};

// LongNet's geometric schedule: w_k = w0 * ratio^k, r_k = ratio^k for k = 0, 1, ... while w_k < n,
// then one last branch whose segment is capped at n.
Schedule geometric_schedule(int64_t w0, int64_t ratio, int64_t n);

// Rotary position embedding (positional = "rotary") or XPOS (positional = "xpos", the contract's
// definition) for x [B, N, H, D]: pairs (x[2i], x[2i+1]) rotated by t * theta_i and, for XPOS,
// scaled by zeta_i^(c_t / scale_base) (queries) or its inverse (keys): the rotary op on cos/sin tables
// with the scale folded in, cached per length, dtype and device.
class RotaryEmbedding {
 public:
  RotaryEmbedding(std::string kind, int64_t head_dim, double scale_base);
  // Throws when XPOS scales for length n leave float32's normal range, naming n and the alternatives.
  Tensor apply(const Tensor& x, bool is_key) const;
  // The same for positions first .. first + N - 1 of a sequence that keeps growing (decoding): XPOS
  // scales about one fixed centre, so positions below max_decode_positions() are encoded alike
  // whatever the length so far. Scores (q.k) equal apply's, whose centre is the length's middle.
  Tensor apply_at(const Tensor& x, bool is_key, int64_t first) const;
  int64_t max_decode_positions() const;  // XPOS: the longest length apply accepts; rotary: unbounded

 private:
  struct Tables {
    Tensor cos_q, sin_q, cos_k, sin_k;  // [N, D/2], scale folded in
  };
  const Tables& tables(int64_t n, DType dtype, Device device) const;
  // Rows for positions first .. first + n - 1, XPOS scales zeta^((t - centre) / scale_base).
  Tables make_tables(int64_t first, int64_t n, int64_t centre, DType dtype, Device device) const;
  Tensor rotate(const Tensor& x, bool is_key, const Tables& tb) const;

  std::string kind_;
  int64_t head_dim_;
  double scale_base_;
  mutable std::map<std::tuple<int64_t, DType, DeviceType, int>, Tables> cache_;
};

// Dropout offsets for the whole model come from one generator, in a fixed order per forward, so
// (seed, offset) after each step is all a checkpoint needs to replay the masks.
class DilatedSelfAttention : public nn::Module {
 public:
  DilatedSelfAttention(const ModelConfig& c, const Schedule& schedule, Generator& init,
                       std::shared_ptr<Generator> dropout_gen, TensorOptions opts);
  // x [B, N, d_model]. With a cache (inference): an empty one is filled from x, the prompt, through
  // the flash forward (prefill); otherwise x holds the next positions, each decoded from the cache.
  Tensor forward(const Tensor& x, AttentionCache* cache = nullptr);
  AttentionCache make_cache(int64_t batch, DType dtype) const;  // dtype: the activations
  void set_schedule(const Schedule& schedule);  // validated; parameters do not depend on it
  const Schedule& schedule() const { return attn_.schedule; }

  std::shared_ptr<nn::Linear> qkv, proj;
  Tensor rel_bias;  // [H, buckets] when enabled

 private:
  Tensor bias_like(const Tensor& q) const;  // rel_bias in q's dtype (undefined without one)
  // q, k, v [B, N, H, D] before position encoding, of the N positions after the cache's.
  Tensor decode(const Tensor& q, const Tensor& k, const Tensor& v, AttentionCache& cache) const;

  int64_t n_heads_, head_dim_;
  DilatedAttentionOptions attn_;
  std::shared_ptr<RotaryEmbedding> rotary_;
  std::shared_ptr<Generator> dropout_gen_;
};

class TransformerBlock : public nn::Module {
 public:
  TransformerBlock(const ModelConfig& c, const Schedule& schedule, Generator& init,
                   std::shared_ptr<Generator> dropout_gen, TensorOptions opts);
  Tensor forward(const Tensor& x, AttentionCache* cache = nullptr);
  void set_compute_dtype(DType dtype) { compute_dtype_ = dtype; }  // TransformerLM::set_compute_dtype

  std::shared_ptr<nn::LayerNorm> ln1, ln2;
  std::shared_ptr<DilatedSelfAttention> attn;
  std::shared_ptr<nn::Linear> fc, fc_out;
  std::shared_ptr<nn::Dropout> drop;

 private:
  DType compute_dtype_;
};

// One generation's attention caches, one per layer (TransformerLM::forward with a cache).
struct KVCache {
  std::vector<AttentionCache> layers;
  int64_t length() const { return layers.empty() ? 0 : layers.front().length(); }
  int64_t bytes() const;
};

class TransformerLM : public nn::Module {
 public:
  // Parameters drawn from Generator(seed); dropout masks from dropout_gen.
  TransformerLM(const ModelConfig& c, uint64_t seed, std::shared_ptr<Generator> dropout_gen,
                TensorOptions opts = {});
  // tokens Int64 [B, T] -> logits [B, T, vocab].
  Tensor forward(const Tensor& tokens);
  // Incremental decoding: tokens [B, T] continue the sequence the cache holds (an empty cache: they
  // start it), logits [B, T, vocab] equal to forward's on the whole sequence, at a cost per token
  // bounded by the schedules (dilatron/attention.h, AttentionCache). Inference only (no gradient).
  Tensor forward(const Tensor& tokens, KVCache& cache);
  // batch Int64 [B, T + 1]: mean next-token cross-entropy of columns 1..T given 0..T-1. weights:
  // undefined, or [B, T] loss weights of those targets (any floating dtype): then the weighted mean.
  Tensor loss(const Tensor& batch, const Tensor& weights = Tensor());

  const ModelConfig& config() const { return config_; }
  // Mixed precision, as under torch.autocast: with dtype bfloat16 over float32 parameters, the
  // attention and MLP branches (their GEMMs, attention, GELU) and the logits run in bfloat16 on bf16
  // copies of the parameters, whose casts' backward accumulates float32 gradients. The residual stream,
  // embedding, layer norms and the loss stay float32, like the parameters and the optimizer state.
  // The parameters' own dtype (the default) switches it off.
  void set_compute_dtype(DType dtype);
  DType compute_dtype() const { return compute_dtype_; }
  // One schedule per layer, e.g. a curriculum stage's; config().layer_schedules follows.
  void set_attention_schedules(const std::vector<Schedule>& schedules);

  std::shared_ptr<nn::Embedding> tok;
  std::shared_ptr<nn::Sequential> layers;                 // "blocks"
  std::vector<std::shared_ptr<TransformerBlock>> blocks;  // the same blocks, typed
  std::shared_ptr<nn::LayerNorm> ln_f;
  std::shared_ptr<nn::Linear> head;  // null when tied to tok
  std::shared_ptr<nn::Dropout> drop;

 private:
  Tensor embed(const Tensor& tokens);  // checked tokens -> [B, T, d_model]
  Tensor logits(const Tensor& x);      // final LayerNorm and the output head

  ModelConfig config_;
  DType compute_dtype_;
};

}  // namespace dilatron
