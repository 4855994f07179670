#include "dilatron/model.h"

#include <cfloat>
#include <cmath>
#include <limits>

#include "dilatron/autograd.h"
#include "dilatron/ops.h"

namespace dilatron {

Schedule geometric_schedule(int64_t w0, int64_t ratio, int64_t n) {
  DILATRON_CHECK(w0 >= 1 && ratio >= 2 && n >= 1, "geometric schedule: needs w0 >= 1, ratio >= 2, n >= 1; got w0 = ",
                 w0, ", ratio = ", ratio, ", n = ", n);
  Schedule s;
  for (int64_t w = w0, r = 1;; w *= ratio, r *= ratio) {
    const int64_t seg = std::min(w, n);
    s.push_back({seg, std::min(r, seg)});
    if (w >= n || s.size() == 16) break;
  }
  return s;
}

// ---------------------------------------------------------------- rotary / XPOS

RotaryEmbedding::RotaryEmbedding(std::string kind, int64_t head_dim, double scale_base)
    : kind_(std::move(kind)), head_dim_(head_dim), scale_base_(scale_base) {
  DILATRON_CHECK(kind_ == "rotary" || kind_ == "xpos", "positional embedding '", kind_, "': expected rotary or xpos");
  DILATRON_CHECK(head_dim % 2 == 0, "rotary/xpos needs an even head dimension, got ", head_dim);
}

namespace {
// XPOS's smallest zeta, (0.4 d) / (1.4 d), of the lowest-frequency pair: the fastest-changing scale.
constexpr double kXposSmallestZeta = 0.4 / 1.4;
}  // namespace

RotaryEmbedding::Tables RotaryEmbedding::make_tables(int64_t first, int64_t n, int64_t centre, DType dtype,
                                                     Device device) const {
  const int64_t half = head_dim_ / 2;
  const auto size = static_cast<size_t>(n * half);
  std::vector<double> cq(size), sq(size), ck(size), sk(size);
  const double d = static_cast<double>(head_dim_);
  for (int64_t row = 0; row < n; ++row) {
    const int64_t t = first + row;
    for (int64_t i = 0; i < half; ++i) {
      const double theta = std::pow(10000.0, -2.0 * static_cast<double>(i) / d);
      const double angle = static_cast<double>(t) * theta;
      double scale = 1.0;
      if (kind_ == "xpos") {
        const double zeta = (2.0 * static_cast<double>(i) + 0.4 * d) / (1.4 * d);
        scale = std::pow(zeta, static_cast<double>(t - centre) / scale_base_);
        // Keys use 1/scale: both must stay normal float32 numbers.
        DILATRON_CHECK(scale > FLT_MIN && scale < FLT_MAX && 1.0 / scale > FLT_MIN && 1.0 / scale < FLT_MAX,
                       "xpos: position ", t, " of ", first + n, " with scale_base ", scale_base_,
                       " puts the position scale (", scale, ") outside float32's range (XPOS reaches ",
                       max_decode_positions(), " positions at this scale_base); use a larger model.xpos_scale_base "
                       "or positional = \"rotary\" (no scale)");
      }
      const auto k = static_cast<size_t>(row * half + i);
      cq[k] = scale * std::cos(angle);
      sq[k] = scale * std::sin(angle);
      ck[k] = std::cos(angle) / scale;
      sk[k] = std::sin(angle) / scale;
    }
  }
  const Shape shape{n, half};
  const TensorOptions opts = TensorOptions(dtype).with_device(device);
  return {Tensor::from_vector(cq, shape, opts), Tensor::from_vector(sq, shape, opts),
          Tensor::from_vector(ck, shape, opts), Tensor::from_vector(sk, shape, opts)};
}

int64_t RotaryEmbedding::max_decode_positions() const {
  if (kind_ != "xpos") return std::numeric_limits<int64_t>::max();
  // |t - centre| / scale_base * |ln zeta| must stay below -ln FLT_MIN (the tighter of the two limits):
  // |t - centre| <= half, the largest integer below that bound, for t in [0, 2 * half].
  const double bound = -std::log(static_cast<double>(FLT_MIN)) * scale_base_ / -std::log(kXposSmallestZeta);
  const auto half = static_cast<int64_t>(std::ceil(bound)) - 1;
  return 2 * half + 1;
}

const RotaryEmbedding::Tables& RotaryEmbedding::tables(int64_t n, DType dtype, Device device) const {
  const auto key = std::make_tuple(n, dtype, device.type, device.index);
  auto it = cache_.find(key);
  if (it != cache_.end()) return it->second;
  const auto c0 = static_cast<int64_t>(std::floor(-static_cast<double>(n) / 2.0));  // centre -c0: the middle
  return cache_.emplace(key, make_tables(0, n, -c0, dtype, device)).first->second;
}

Tensor RotaryEmbedding::rotate(const Tensor& x, bool is_key, const Tables& tb) const {
  DILATRON_CHECK(x.dim() == 4 && x.size(3) == head_dim_, "rotary/xpos: expected [B, N, H, ", head_dim_, "], got ",
                 shape_str(x.shape()));
  return is_key ? rotary(x, tb.cos_k, tb.sin_k) : rotary(x, tb.cos_q, tb.sin_q);
}

Tensor RotaryEmbedding::apply(const Tensor& x, bool is_key) const {
  DILATRON_CHECK(x.dim() == 4, "rotary/xpos: expected [B, N, H, ", head_dim_, "], got ", shape_str(x.shape()));
  return rotate(x, is_key, tables(x.size(1), compute_dtype(x.dtype()), x.device()));
}

Tensor RotaryEmbedding::apply_at(const Tensor& x, bool is_key, int64_t first) const {
  DILATRON_CHECK(x.dim() == 4, "rotary/xpos: expected [B, N, H, ", head_dim_, "], got ", shape_str(x.shape()));
  const int64_t centre = kind_ == "xpos" ? max_decode_positions() / 2 : 0;  // half
  return rotate(x, is_key, make_tables(first, x.size(1), centre, compute_dtype(x.dtype()), x.device()));
}

// ---------------------------------------------------------------- modules

namespace {
// GPT-2 initialisation: weights N(0, std), biases zero.
void init_linear(nn::Linear& l, Generator& gen, double std) {
  autograd::NoGradGuard g;
  l.weight.copy_(Tensor::randn(l.weight.shape(), gen, l.weight.options(), 0.0, std));
  if (l.bias.defined()) l.bias.zero_();
}
}  // namespace

DilatedSelfAttention::DilatedSelfAttention(const ModelConfig& c, const Schedule& schedule, Generator& init,
                                           std::shared_ptr<Generator> dropout_gen, TensorOptions opts)
    : n_heads_(c.n_heads), head_dim_(c.d_model / c.n_heads), dropout_gen_(std::move(dropout_gen)) {
  qkv = register_module("qkv", std::make_shared<nn::Linear>(c.d_model, 3 * c.d_model, init, true, opts));
  proj = register_module("proj", std::make_shared<nn::Linear>(c.d_model, c.d_model, init, true, opts));
  init_linear(*qkv, init, c.init_std);
  // Residual projections scaled down with depth (GPT-2).
  init_linear(*proj, init, c.init_std / std::sqrt(2.0 * static_cast<double>(c.n_layers)));
  if (c.rel_pos_bias) rel_bias = register_parameter("rel_bias", Tensor::zeros({c.n_heads, c.bias_buckets}, opts));
  if (c.positional != "none") rotary_ = std::make_shared<RotaryEmbedding>(c.positional, head_dim_, c.xpos_scale_base);
  set_schedule(schedule);
  attn_.causal = true;
  attn_.dropout = c.attn_dropout;
  attn_.bias_num_buckets = c.bias_buckets;
  attn_.bias_max_distance = c.bias_max_distance;
}

void DilatedSelfAttention::set_schedule(const Schedule& schedule) {
  validate_schedule(schedule);
  attn_.schedule = schedule;
}

Tensor DilatedSelfAttention::forward(const Tensor& x, AttentionCache* cache) {
  const int64_t b = x.size(0), n = x.size(1), d = x.size(2);
  // q, k, v are strided views of the fused projection (rotary reads them in place); split's backward
  // writes their three gradients into one [B, N, 3, H, D] tensor in a single pass.
  const std::vector<Tensor> parts = split(reshape(qkv->forward(x), {b, n, 3, n_heads_, head_dim_}), 1, 2);
  Tensor q = reshape(parts[0], {b, n, n_heads_, head_dim_});
  Tensor k = reshape(parts[1], {b, n, n_heads_, head_dim_});
  Tensor v = reshape(parts[2], {b, n, n_heads_, head_dim_});
  if (cache && cache->length() > 0) return proj->forward(reshape(decode(q, k, v, *cache), {b, n, d}));
  if (cache) cache->append(rotary_ ? rotary_->apply_at(k, true, 0) : k, v);  // prefill
  if (rotary_) {
    q = rotary_->apply(q, false);
    k = rotary_->apply(k, true);
  }
  DilatedAttentionOptions opts = attn_;
  if (is_training() && opts.dropout > 0.0) {
    opts.seed = dropout_gen_->seed();
    opts.offset = static_cast<uint32_t>(dropout_gen_->next_offset());
  } else {
    opts.dropout = 0.0;
  }
  Tensor o = dilated_attention(q.contiguous(), k.contiguous(), v.contiguous(), opts, bias_like(q));
  return proj->forward(reshape(o, {b, n, d}));
}

Tensor DilatedSelfAttention::decode(const Tensor& q, const Tensor& k, const Tensor& v, AttentionCache& cache) const {
  std::vector<Tensor> outputs;
  for (int64_t i = 0; i < q.size(1); ++i) {
    const int64_t t = cache.length();
    const Tensor qt = narrow(q, 1, i, 1), kt = narrow(k, 1, i, 1);
    cache.append(rotary_ ? rotary_->apply_at(kt, true, t) : kt, narrow(v, 1, i, 1));
    outputs.push_back(
        dilated_attention_decode(rotary_ ? rotary_->apply_at(qt, false, t) : qt, cache, attn_, bias_like(q)));
  }
  return outputs.size() == 1 ? outputs[0] : cat(outputs, 1);
}

Tensor DilatedSelfAttention::bias_like(const Tensor& q) const {
  return rel_bias.defined() ? rel_bias.to(q.dtype()) : rel_bias;
}

AttentionCache DilatedSelfAttention::make_cache(int64_t batch, DType dtype) const {
  return AttentionCache(attn_.schedule, batch, n_heads_, head_dim_, qkv->weight.options().with_dtype(dtype));
}

TransformerBlock::TransformerBlock(const ModelConfig& c, const Schedule& schedule, Generator& init,
                                   std::shared_ptr<Generator> dropout_gen, TensorOptions opts)
    : compute_dtype_(opts.dtype) {
  ln1 = register_module("ln1", std::make_shared<nn::LayerNorm>(c.d_model, 1e-5, true, opts));
  attn = register_module("attn", std::make_shared<DilatedSelfAttention>(c, schedule, init, dropout_gen, opts));
  ln2 = register_module("ln2", std::make_shared<nn::LayerNorm>(c.d_model, 1e-5, true, opts));
  fc = register_module("fc", std::make_shared<nn::Linear>(c.d_model, c.d_ff, init, true, opts));
  fc_out = register_module("fc_out", std::make_shared<nn::Linear>(c.d_ff, c.d_model, init, true, opts));
  init_linear(*fc, init, c.init_std);
  init_linear(*fc_out, init, c.init_std / std::sqrt(2.0 * static_cast<double>(c.n_layers)));
  drop = register_module("drop", std::make_shared<nn::Dropout>(c.dropout, dropout_gen));
}

// Each branch runs in the compute dtype, from its layer norm's output to its projection's, and joins
// the residual stream in the stream's dtype: autocast's rounding points.
Tensor TransformerBlock::forward(const Tensor& x, AttentionCache* cache) {
  const auto branch_in = [&](const Tensor& normed) { return normed.to(compute_dtype_); };
  const auto branch_out = [&](const Tensor& y) { return drop->forward(y.to(x.dtype())); };
  Tensor h = add(x, branch_out(attn->forward(branch_in(ln1->forward(x)), cache)));
  return add(h, branch_out(fc_out->forward(gelu(fc->forward(branch_in(ln2->forward(h)))))));
}

TransformerLM::TransformerLM(const ModelConfig& c, uint64_t seed, std::shared_ptr<Generator> dropout_gen,
                             TensorOptions opts)
    : config_(c), compute_dtype_(opts.dtype) {
  DILATRON_CHECK(c.d_model % c.n_heads == 0, "model: n_heads = ", c.n_heads, " must divide d_model = ", c.d_model);
  DILATRON_CHECK(static_cast<int64_t>(c.layer_schedules.size()) == c.n_layers, "model: ", c.layer_schedules.size(),
                 " layer schedules for n_layers = ", c.n_layers);
  Generator init(seed);
  tok = register_module("tok", std::make_shared<nn::Embedding>(c.vocab_size, c.d_model, init, c.init_std, opts));
  drop = register_module("drop", std::make_shared<nn::Dropout>(c.dropout, dropout_gen));
  layers = register_module("blocks", std::make_shared<nn::Sequential>());
  for (int64_t l = 0; l < c.n_layers; ++l) {
    blocks.push_back(
        std::make_shared<TransformerBlock>(c, c.layer_schedules[static_cast<size_t>(l)], init, dropout_gen, opts));
    layers->append(blocks.back());  // named blocks.<l>
  }
  ln_f = register_module("ln_f", std::make_shared<nn::LayerNorm>(c.d_model, 1e-5, true, opts));
  if (!c.tie_embeddings) {
    head = register_module("head", std::make_shared<nn::Linear>(c.d_model, c.vocab_size, init, false, opts));
    init_linear(*head, init, c.init_std);
  }
}

void TransformerLM::set_attention_schedules(const std::vector<Schedule>& schedules) {
  DILATRON_CHECK(schedules.size() == blocks.size(), "model: ", schedules.size(), " layer schedules for n_layers = ",
                 blocks.size());
  for (const Schedule& s : schedules) validate_schedule(s);  // all or nothing
  for (size_t l = 0; l < blocks.size(); ++l) blocks[l]->attn->set_schedule(schedules[l]);
  config_.layer_schedules = schedules;
}

Tensor TransformerLM::embed(const Tensor& tokens) {
  DILATRON_CHECK(tokens.dim() == 2 && tokens.dtype() == DType::Int64, "TransformerLM: tokens must be int64 [B, T], got ",
                 dtype_name(tokens.dtype()), " ", shape_str(tokens.shape()));
  return drop->forward(tok->forward(tokens.contiguous()));
}

void TransformerLM::set_compute_dtype(DType dtype) {
  const DType params = tok->weight.dtype();
  DILATRON_CHECK(dtype == params || (dtype == DType::BFloat16 && params == DType::Float32), "TransformerLM: compute ",
                 "dtype ", dtype_name(dtype), " over ", dtype_name(params), " parameters; expected the parameters' ",
                 "dtype, or bfloat16 over float32 (mixed precision)");
  compute_dtype_ = dtype;
  for (const auto& block : blocks) block->set_compute_dtype(dtype);
}

Tensor TransformerLM::logits(const Tensor& x) {
  const Tensor y = ln_f->forward(x).to(compute_dtype_);
  return head ? head->forward(y) : matmul(y, transpose(tok->weight.to(compute_dtype_), 0, 1));
}

Tensor TransformerLM::forward(const Tensor& tokens) { return logits(layers->forward(embed(tokens))); }

Tensor TransformerLM::forward(const Tensor& tokens, KVCache& cache) {
  DILATRON_CHECK(!is_training(), "TransformerLM: decoding with a cache needs eval mode (call eval() first)");
  autograd::NoGradGuard no_grad;
  if (cache.layers.empty())
    for (const auto& block : blocks) cache.layers.push_back(block->attn->make_cache(tokens.size(0), compute_dtype_));
  DILATRON_CHECK(cache.layers.size() == blocks.size(), "TransformerLM: a cache of ", cache.layers.size(),
                 " layers for ", blocks.size());
  Tensor x = embed(tokens);
  for (size_t l = 0; l < blocks.size(); ++l) x = blocks[l]->forward(x, &cache.layers[l]);
  return logits(x);
}

int64_t KVCache::bytes() const {
  int64_t n = 0;
  for (const AttentionCache& c : layers) n += c.bytes();
  return n;
}

Tensor TransformerLM::loss(const Tensor& batch, const Tensor& weights) {
  const int64_t b = batch.size(0), t = batch.size(1) - 1;
  // float32 logits under mixed precision: autocast runs cross_entropy in float32.
  Tensor logits = forward(narrow(batch, 1, 0, t)).to(tok->weight.dtype());
  Tensor targets = narrow(batch, 1, 1, t).contiguous();
  DILATRON_CHECK(!weights.defined() || weights.shape() == Shape({b, t}), "TransformerLM::loss: weights must be ",
                 shape_str({b, t}), " for batch ", shape_str(batch.shape()), ", got ", shape_str(weights.shape()));
  const Tensor w = weights.defined() ? reshape(weights.to(logits.dtype()).to(logits.device()), {b * t}) : Tensor();
  return cross_entropy(reshape(logits, {b * t, config_.vocab_size}), reshape(targets, {b * t}), -100, "mean", w);
}

}  // namespace dilatron
