// Argument checks shared by the CPU and CUDA kernels. Every message names the argument.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <initializer_list>
#include <optional>
#include <string>
#include <vector>

#define MMK_CHECK_ARG(cond, arg, ...) TORCH_CHECK(cond, "mmkernels: argument '", arg, "': ", __VA_ARGS__)

namespace mmkernels {

inline void check_same_device_dtype(const at::Tensor& t, const at::Tensor& ref, const char* arg) {
  MMK_CHECK_ARG(t.device() == ref.device(), arg, "expected device ", ref.device(), ", got ", t.device());
  MMK_CHECK_ARG(t.scalar_type() == ref.scalar_type(), arg, "expected dtype ", ref.scalar_type(), ", got ",
                t.scalar_type());
}

// `t` is on `device` and of one of `dtypes` (described for the message as `dtype_names`).
inline void check_device_and_dtypes(const at::Tensor& t, const char* arg, c10::DeviceType device,
                                    std::initializer_list<at::ScalarType> dtypes, const char* dtype_names) {
  MMK_CHECK_ARG(t.device().type() == device, arg, "expected a ", c10::DeviceTypeName(device, true),
                " tensor, got device ", t.device());
  bool ok = false;
  for (auto dt : dtypes) ok = ok || t.scalar_type() == dt;
  MMK_CHECK_ARG(ok, arg, "expected ", dtype_names, ", got ", t.scalar_type());
}

// fused_concat_linear's inputs, weight and bias, the same on every backend (the weight's device type and
// dtype are the backend's to check first). Returns the inputs' common leading dims.
inline std::vector<int64_t> check_concat_linear(at::TensorList inputs, const at::Tensor& weight,
                                                const std::optional<at::Tensor>& bias) {
  MMK_CHECK_ARG(!inputs.empty(), "inputs", "expected at least one tensor, got an empty list");
  MMK_CHECK_ARG(weight.dim() == 2, "weight", "expected a 2-D (out_features, in_features) tensor, got ",
                weight.dim(), "-D");
  auto lead = inputs[0].sizes().vec();
  MMK_CHECK_ARG(!lead.empty(), "inputs[0]", "expected at least 1 dimension (..., features), got a 0-D tensor");
  lead.pop_back();
  int64_t total = 0;
  for (size_t s = 0; s < inputs.size(); ++s) {
    const auto& x = inputs[s];
    const std::string name = "inputs[" + std::to_string(s) + "]";
    MMK_CHECK_ARG(x.dim() >= 1, name, "expected at least 1 dimension (..., features), got a 0-D tensor");
    check_same_device_dtype(x, weight, name.c_str());
    MMK_CHECK_ARG(x.sizes().slice(0, x.dim() - 1).equals(lead), name, "expected leading dims ",
                  at::IntArrayRef(lead), " (those of inputs[0]), got ", x.sizes().slice(0, x.dim() - 1));
    total += x.size(-1);
  }
  MMK_CHECK_ARG(total == weight.size(1), "weight", "expected ", total,
                " columns (the sum of the inputs' feature sizes), got shape ", weight.sizes());
  if (bias.has_value()) {
    MMK_CHECK_ARG(bias->dim() == 1 && bias->size(0) == weight.size(0), "bias", "expected shape (", weight.size(0),
                  "), got ", bias->sizes());
    check_same_device_dtype(*bias, weight, "bias");
  }
  return lead;
}

// low_rank_fusion's inputs, factors, rank weight and bias, the same on every backend (the rank weight's
// device type and dtype are the backend's to check first). Returns the inputs' common leading dims.
inline std::vector<int64_t> check_low_rank_fusion(at::TensorList inputs, at::TensorList factors,
                                                  const at::Tensor& rank_weight, const std::optional<at::Tensor>& bias) {
  MMK_CHECK_ARG(!inputs.empty(), "inputs", "expected at least one tensor, got an empty list");
  MMK_CHECK_ARG(factors.size() == inputs.size(), "factors", "expected one factor per input (", inputs.size(),
                "), got ", factors.size());
  MMK_CHECK_ARG(rank_weight.dim() == 1, "rank_weight", "expected a 1-D (rank,) tensor, got shape ",
                rank_weight.sizes());
  MMK_CHECK_ARG(factors[0].dim() == 3, "factors[0]",
                "expected a 3-D (rank, in_features + 1, out_features) tensor, got ", factors[0].dim(), "-D");
  const int64_t R = rank_weight.size(0), N = factors[0].size(2);
  MMK_CHECK_ARG(inputs[0].dim() >= 1, "inputs[0]", "expected at least 1 dimension (..., features), got a 0-D tensor");
  auto lead = inputs[0].sizes().vec();
  lead.pop_back();
  for (size_t m = 0; m < inputs.size(); ++m) {
    const auto& x = inputs[m];
    const auto& f = factors[m];
    const std::string xn = "inputs[" + std::to_string(m) + "]", fn = "factors[" + std::to_string(m) + "]";
    MMK_CHECK_ARG(x.dim() >= 1, xn, "expected at least 1 dimension (..., features), got a 0-D tensor");
    check_same_device_dtype(x, rank_weight, xn.c_str());
    check_same_device_dtype(f, rank_weight, fn.c_str());
    MMK_CHECK_ARG(x.sizes().slice(0, x.dim() - 1).equals(lead), xn, "expected leading dims ", at::IntArrayRef(lead),
                  " (those of inputs[0]), got ", x.sizes().slice(0, x.dim() - 1));
    const int64_t d = x.size(-1);
    MMK_CHECK_ARG(f.dim() == 3 && f.size(0) == R && f.size(1) == d + 1 && f.size(2) == N, fn, "expected shape (", R,
                  ", ", d + 1, ", ", N, ") = (rank, ", xn, ".size(-1) + 1, out_features), got ", f.sizes());
  }
  if (bias.has_value()) {
    MMK_CHECK_ARG(bias->dim() == 1 && bias->size(0) == N, "bias", "expected shape (", N, "), got ", bias->sizes());
    check_same_device_dtype(*bias, rank_weight, "bias");
  }
  return lead;
}

// cross_modal_attention's q, k, v: ranks, and the sizes, device and dtype they must share (q's device
// type and dtype are the backend's to check first).
inline void check_attention_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_same_device_dtype(k, q, "k");
  check_same_device_dtype(v, q, "v");
  MMK_CHECK_ARG(k.size(0) == q.size(0), "k", "expected batch size ", q.size(0), " (that of q), got ", k.size(0));
  MMK_CHECK_ARG(v.size(0) == q.size(0), "v", "expected batch size ", q.size(0), " (that of q), got ", v.size(0));
  // Grouped-query attention: k and v may have fewer heads, a divisor of q's (the Python wrapper
  // requires enable_gqa=True for that, as SDPA does).
  MMK_CHECK_ARG(k.size(1) > 0 ? q.size(1) % k.size(1) == 0 : q.size(1) == 0, "k", "expected a head count dividing ",
                q.size(1), " (the heads of q), got ", k.size(1));
  MMK_CHECK_ARG(v.size(1) == k.size(1), "v", "expected ", k.size(1), " heads (those of k), got ", v.size(1));
  MMK_CHECK_ARG(k.size(3) == q.size(3), "k", "expected head dim ", q.size(3), " (that of q), got ", k.size(3));
  MMK_CHECK_ARG(v.size(2) == k.size(2), "v", "expected ", k.size(2), " keys (Lk of k), got ", v.size(2));
}

// The ranks of q, k, v (checked before anything reads their sizes).
inline void check_attention_ranks(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  MMK_CHECK_ARG(q.dim() == 4, "q", "expected a 4-D (batch, heads, Lq, E) tensor, got shape ", q.sizes());
  MMK_CHECK_ARG(k.dim() == 4, "k", "expected a 4-D (batch, heads, Lk, E) tensor, got shape ", k.sizes());
  MMK_CHECK_ARG(v.dim() == 4, "v", "expected a 4-D (batch, heads, Lk, Ev) tensor, got shape ", v.sizes());
}

// cross_modal_attention_varlen's packed q (total_q, H, E), k / v (total_k, H_kv, E|Ev) and prefix
// sums (int32 (batch + 1,), on q's device or the CPU): ranks, rows, dtypes and sizes. Their values are
// the backend's to check (the CPU reads them; CUDA would need a device-to-host sync).
inline void check_varlen_shapes(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q,
                                const at::Tensor& cu_k) {
  MMK_CHECK_ARG(q.dim() == 3, "q", "expected a 3-D (total_q, H, E) tensor, got shape ", q.sizes());
  MMK_CHECK_ARG(k.dim() == 3, "k", "expected a 3-D (total_k, H_kv, E) tensor, got shape ", k.sizes());
  MMK_CHECK_ARG(v.dim() == 3, "v", "expected a 3-D (total_k, H_kv, Ev) tensor, got shape ", v.sizes());
  MMK_CHECK_ARG(v.size(0) == k.size(0), "v", "expected ", k.size(0), " rows (total_k of k), got ", v.size(0));
  const auto check_prefix_sums = [](const at::Tensor& cu, const char* name) {
    MMK_CHECK_ARG(cu.scalar_type() == at::kInt, name, "expected an int32 tensor, got ", cu.scalar_type());
    MMK_CHECK_ARG(cu.dim() == 1 && cu.size(0) >= 1, name, "expected a 1-D (batch + 1,) tensor, got shape ",
                  cu.sizes());
  };
  check_prefix_sums(cu_q, "cu_seqlens_q");
  check_prefix_sums(cu_k, "cu_seqlens_k");
  MMK_CHECK_ARG(cu_k.size(0) == cu_q.size(0), "cu_seqlens_k", "expected ", cu_q.size(0),
                " entries (those of cu_seqlens_q), got ", cu_k.size(0));
}

// The op's causal mode: 0 none, 1 upper-left, 2 lower-right.
inline void check_causal_mode(int64_t causal) {
  MMK_CHECK_ARG(causal >= 0 && causal <= 2, "causal", "expected 0 (none), 1 (upper-left) or 2 (lower-right), got ",
                causal);
}

// cross_modal_attention's masks, lengths and dropout arguments (after check_attention_qkv). Masks live
// on q's device; kv_lengths may also be a CPU tensor. Values are the backend's to check.
inline void check_attention_options(const at::Tensor& q, const at::Tensor& k,
                                    const std::optional<at::Tensor>& key_padding_mask,
                                    const std::optional<at::Tensor>& kv_lengths,
                                    const std::optional<at::Tensor>& attn_mask, double dropout_p,
                                    const std::optional<at::Tensor>& dropout_seed) {
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), Lk = k.size(2);
  if (key_padding_mask.has_value()) {
    const auto& m = *key_padding_mask;
    MMK_CHECK_ARG(m.scalar_type() == at::kBool, "key_padding_mask", "expected a bool tensor (True = ignore), got ",
                  m.scalar_type());
    MMK_CHECK_ARG(m.dim() == 2 && m.size(0) == B && m.size(1) == Lk, "key_padding_mask", "expected shape (", B, ", ",
                  Lk, "), got ", m.sizes());
    MMK_CHECK_ARG(m.device() == q.device(), "key_padding_mask", "expected device ", q.device(), ", got ", m.device());
  }
  if (kv_lengths.has_value()) {
    const auto& len = *kv_lengths;
    MMK_CHECK_ARG(len.scalar_type() == at::kInt || len.scalar_type() == at::kLong, "kv_lengths",
                  "expected an int32 or int64 tensor, got ", len.scalar_type());
    MMK_CHECK_ARG(len.dim() == 1 && len.size(0) == B, "kv_lengths", "expected shape (", B, "), got ", len.sizes());
    MMK_CHECK_ARG(len.device() == q.device() || len.device().is_cpu(), "kv_lengths", "expected device ", q.device(),
                  " or the CPU, got ", len.device());
  }
  if (attn_mask.has_value()) {
    const auto& m = *attn_mask;
    MMK_CHECK_ARG(m.scalar_type() == at::kBool || at::isFloatingType(m.scalar_type()), "attn_mask",
                  "expected a bool (True = may attend) or floating (additive) tensor, got ", m.scalar_type());
    MMK_CHECK_ARG(m.device() == q.device(), "attn_mask", "expected device ", q.device(), ", got ", m.device());
    MMK_CHECK_ARG(m.dim() >= 2 && m.dim() <= 4, "attn_mask", "expected 2 to 4 dims broadcastable to (B, H, Lq, Lk) = (",
                  B, ", ", H, ", ", Lq, ", ", Lk, "), got shape ", m.sizes());
    const int64_t full[4] = {B, H, Lq, Lk};
    for (int64_t d = 0; d < m.dim(); ++d) {
      const int64_t want = full[4 - m.dim() + d];
      MMK_CHECK_ARG(m.size(d) == want || m.size(d) == 1, "attn_mask", "expected a shape broadcastable to (", B, ", ",
                    H, ", ", Lq, ", ", Lk, "), got ", m.sizes());
    }
  }
  MMK_CHECK_ARG(dropout_p >= 0.0 && dropout_p <= 1.0, "dropout_p", "expected a probability in [0, 1], got ",
                dropout_p);
  if (dropout_p > 0.0) {
    MMK_CHECK_ARG(dropout_seed.has_value(), "dropout_seed", "expected a seed tensor when dropout_p > 0");
    const auto& s = *dropout_seed;
    MMK_CHECK_ARG(s.numel() == 1 && s.scalar_type() == at::kLong, "dropout_seed",
                  "expected a one-element int64 tensor, got ", s.scalar_type(), " of shape ", s.sizes());
  }
}

}  // namespace mmkernels
