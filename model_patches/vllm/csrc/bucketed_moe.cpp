// One native call per pruned MoE layer on CPU: the whole width-bucket dispatch of
// model_patches/vllm/layer.py (sort pairs by bucket, gather rows, one vLLM `_C::cpu_fused_moe`
// grouped GEMM per non-empty bucket, fp32 sum per token) without Python, host syncs or extra torch
// launches. vLLM compiles the CPU model with Dynamo; this op is opaque to it (a fake in Python gives
// the shape), so a decode step runs no Python for the routed experts, as stock vLLM's does not.
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace {

const c10::OperatorHandle& vllm_kernel() {
  // vLLM's own CPU grouped-GEMM MoE (vllm/_C), looked up once; vllm._custom_ops is imported first
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("_C::cpu_fused_moe", "");
  return op;
}

void run_kernel(at::Tensor& out, const at::Tensor& input, const at::Tensor& w13, const at::Tensor& w2,
                const at::Tensor& weights, const at::Tensor& ids, const std::string& act,
                const std::string& isa) {
  torch::jit::Stack stack;
  stack.reserve(11);
  stack.emplace_back(out);
  stack.emplace_back(input);
  stack.emplace_back(w13);
  stack.emplace_back(w2);
  stack.emplace_back(c10::IValue());
  stack.emplace_back(c10::IValue());
  stack.emplace_back(weights);
  stack.emplace_back(ids);
  stack.emplace_back(false);
  stack.emplace_back(act);
  stack.emplace_back(isa);
  vllm_kernel().callBoxed(&stack);
}

template <typename scalar_t>
void add_rows(float* acc, const scalar_t* y, int64_t H) {
  for (int64_t h = 0; h < H; ++h) acc[h] += static_cast<float>(y[h]);
}

// The routing of one call in contiguous form: rows, (token, slot) expert ids and weights, and the
// expert -> (bucket, slot in bucket) maps; shared by both bucketed dispatches.
struct Routing {
  at::Tensor x, ids, wts, bucket_of_c, local_of_c;
  int64_t T, H, K, E;
  const int64_t* id;
  const float* wt;
  const int32_t* bucket_of;
  const int32_t* local_of;
  Routing(const at::Tensor& x_in, const at::Tensor& topk_weights, const at::Tensor& topk_ids,
          const at::Tensor& bucket_of_t, const at::Tensor& local_of_t)
      : x(x_in.contiguous()), ids(topk_ids.to(at::kLong).contiguous()), wts(topk_weights.to(at::kFloat).contiguous()),
        bucket_of_c(bucket_of_t.to(at::kInt).contiguous()), local_of_c(local_of_t.to(at::kInt).contiguous()),
        T(x.size(0)), H(x.size(1)), K(topk_ids.size(1)), E(bucket_of_c.numel()), id(ids.data_ptr<int64_t>()),
        wt(wts.data_ptr<float>()), bucket_of(bucket_of_c.data_ptr<int32_t>()), local_of(local_of_c.data_ptr<int32_t>()) {}
};

at::Tensor bucketed_moe(const at::Tensor& x_in, const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                        const at::Tensor& bucket_of_t, const at::Tensor& local_of_t, at::TensorList w13,
                        at::TensorList w2, c10::string_view act_sv, c10::string_view isa_sv) {
  TORCH_CHECK(x_in.dim() == 2 && topk_ids.dim() == 2 && topk_weights.sizes() == topk_ids.sizes());
  TORCH_CHECK(w13.size() == w2.size(), "one w13 and one w2 stack per bucket");
  const std::string act(act_sv), isa(isa_sv);
  const Routing r(x_in, topk_weights, topk_ids, bucket_of_t, local_of_t);
  const at::Tensor &x = r.x, &ids = r.ids, &wts = r.wts;
  const int64_t T = r.T, H = r.H, K = r.K, E = r.E;
  const int64_t* id = r.id;
  const float* wt = r.wt;
  const int32_t *bucket_of = r.bucket_of, *local_of = r.local_of;
  const int64_t B = static_cast<int64_t>(w13.size());

  at::Tensor acc = at::zeros({T, H}, x.options().dtype(at::kFloat));
  float* accp = acc.data_ptr<float>();

  // counting sort of the (token, slot) pairs by bucket, stable (pair order within a bucket);
  // pairs on width-0 experts (bucket -1) contribute exactly zero and are dropped
  std::vector<int64_t> count(B + 1, 0);
  for (int64_t p = 0; p < T * K; ++p) {
    const int64_t e = id[p];
    TORCH_CHECK(e >= 0 && e < E, "expert id ", e, " out of range");
    ++count[bucket_of[e] + 1];
  }
  std::vector<int64_t> start(B + 1, 0);
  for (int64_t b = 1; b <= B; ++b) start[b] = start[b - 1] + count[b - 1];
  const int64_t kept = T * K - count[0];
  if (kept == 0) return acc.to(x.scalar_type());
  std::vector<int64_t> order(T * K);
  {
    std::vector<int64_t> next(start);
    for (int64_t p = 0; p < T * K; ++p) order[next[bucket_of[id[p]] + 1]++] = p;
  }
  const int64_t skip = count[0];

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "heapr_bucketed_moe", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    if (T == 1) {
      // a decode step of one sequence: each bucket runs the token itself with its experts as a
      // smaller top-k (no gather, no scatter)
      for (int64_t b = 0; b < B; ++b) {
        const int64_t n = count[b + 1];
        if (n == 0) continue;
        at::Tensor loc = at::empty({1, n}, ids.options().dtype(at::kInt));
        at::Tensor w = at::empty({1, n}, wts.options());
        for (int64_t j = 0; j < n; ++j) {
          const int64_t p = order[start[b + 1] + j];
          loc.data_ptr<int32_t>()[j] = local_of[id[p]];
          w.data_ptr<float>()[j] = wt[p];
        }
        at::Tensor y = at::empty({1, H}, x.options());
        run_kernel(y, x, w13[b], w2[b], w, loc, act, isa);
        add_rows(accp, y.data_ptr<scalar_t>(), H);
      }
      return;
    }
    // many tokens: gather the kept pairs' rows in bucket order, one kernel call per bucket on its
    // contiguous row range (top-1 per row), then sum rows into their token in that same order
    at::Tensor rows = at::empty({kept, H}, x.options());
    at::Tensor loc = at::empty({kept, 1}, ids.options().dtype(at::kInt));
    at::Tensor w = at::empty({kept, 1}, wts.options());
    scalar_t* rp = rows.data_ptr<scalar_t>();
    int32_t* lp = loc.data_ptr<int32_t>();
    float* wp = w.data_ptr<float>();
    for (int64_t r = 0; r < kept; ++r) {
      const int64_t p = order[skip + r];
      std::memcpy(rp + r * H, xp + (p / K) * H, H * sizeof(scalar_t));
      lp[r] = local_of[id[p]];
      wp[r] = wt[p];
    }
    at::Tensor y = at::empty({kept, H}, x.options());
    for (int64_t b = 0; b < B; ++b) {
      const int64_t n = count[b + 1];
      if (n == 0) continue;
      const int64_t s = start[b + 1] - skip;
      at::Tensor yb = y.narrow(0, s, n);
      run_kernel(yb, rows.narrow(0, s, n), w13[b], w2[b], w.narrow(0, s, n), loc.narrow(0, s, n), act, isa);
    }
    const scalar_t* yp = y.data_ptr<scalar_t>();
    for (int64_t r = 0; r < kept; ++r) add_rows(accp + (order[skip + r] / K) * H, yp + r * H, H);
  });
  return acc.to(x.scalar_type());
}

// The slice layout (model_patches/vllm/buckets.py): expert e is slices [start[e], start[e] + count[e])
// of one uniform stack. Each token's top-k experts become its slices (same router weight each),
// padded to the batch's largest slice count with a slice of its own at weight 0, and the whole layer
// is one vLLM kernel call, straight from x to out. `zero` pads tokens that have no slice at all.
at::Tensor sliced_moe(const at::Tensor& x_in, const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                      const at::Tensor& start_t, const at::Tensor& count_t, const at::Tensor& w13,
                      const at::Tensor& w2, int64_t zero, c10::string_view act_sv, c10::string_view isa_sv) {
  TORCH_CHECK(x_in.dim() == 2 && topk_ids.dim() == 2 && topk_weights.sizes() == topk_ids.sizes());
  const at::Tensor x = x_in.contiguous();
  const int64_t T = x.size(0), K = topk_ids.size(1);
  const at::Tensor ids = topk_ids.to(at::kLong).contiguous();
  const at::Tensor wts = topk_weights.to(at::kFloat).contiguous();
  const at::Tensor start_c = start_t.to(at::kInt).contiguous(), count_c = count_t.to(at::kInt).contiguous();
  const int64_t* id = ids.data_ptr<int64_t>();
  const float* wt = wts.data_ptr<float>();
  const int32_t* start = start_c.data_ptr<int32_t>();
  const int32_t* count = count_c.data_ptr<int32_t>();
  const int64_t E = start_c.numel();
  int64_t width = 0;
  for (int64_t t = 0; t < T; ++t) {
    int64_t n = 0;
    for (int64_t j = 0; j < K; ++j) {
      const int64_t e = id[t * K + j];
      TORCH_CHECK(e >= 0 && e < E, "expert id ", e, " out of range");
      n += count[e];
    }
    width = std::max(width, n);
  }
  at::Tensor out = at::empty_like(x);
  if (width == 0) return out.zero_();
  at::Tensor sid = at::empty({T, width}, ids.options().dtype(at::kInt));
  at::Tensor sw = at::empty({T, width}, wts.options());
  int32_t* sp = sid.data_ptr<int32_t>();
  float* wp = sw.data_ptr<float>();
  for (int64_t t = 0; t < T; ++t) {
    int64_t n = 0;
    for (int64_t j = 0; j < K; ++j) {
      const int64_t e = id[t * K + j];
      for (int32_t c = 0; c < count[e]; ++c, ++n) {
        sp[t * width + n] = start[e] + c;
        wp[t * width + n] = wt[t * K + j];
      }
    }
    // pad with the token's own first slice at weight 0: exact, and if that slice's output were
    // not finite the token's real slot already carries it (slice `zero` only when it has none)
    const int32_t pad = n ? sp[t * width] : static_cast<int32_t>(zero);
    for (; n < width; ++n) {
      sp[t * width + n] = pad;
      wp[t * width + n] = 0.f;
    }
  }
  run_kernel(out, x, w13, w2, sw, sid, std::string(act_sv), std::string(isa_sv));
  return out;
}


// Quantized buckets on AMD Zen CPUs (model_patches/vllm/quantized.py): the same dispatch for W8A8
// int8 buckets, each run by zentorch's `zentorch_fused_moe` (the kernel vLLM's ZenCPUExpertsInt8
// calls), with per-channel f32 scales. zentorch needs >= 2 distinct experts with rows in a call, so
// a bucket whose rows all hit one expert gets one extra row on another slot at weight 0 (a bucket of
// one expert has an all-zero second slot, added at load time).
const c10::OperatorHandle& zentorch_kernel() {
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("zentorch::zentorch_fused_moe", "");
  return op;
}

at::Tensor zentorch_bucketed_moe(const at::Tensor& x_in, const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                                 const at::Tensor& bucket_of_t, const at::Tensor& local_of_t, at::TensorList w13,
                                 at::TensorList w2, at::TensorList s13, at::TensorList s2, c10::string_view act_sv) {
  TORCH_CHECK(x_in.dim() == 2 && topk_ids.dim() == 2 && topk_weights.sizes() == topk_ids.sizes());
  TORCH_CHECK(w13.size() == w2.size() && s13.size() == w13.size() && s2.size() == w13.size(), "one stack set per bucket");
  const std::string act(act_sv);
  const Routing r(x_in, topk_weights, topk_ids, bucket_of_t, local_of_t);
  const at::Tensor &x = r.x, &ids = r.ids, &wts = r.wts;
  const int64_t T = r.T, H = r.H, K = r.K, E = r.E;
  const int64_t* id = r.id;
  const float* wt = r.wt;
  const int32_t *bucket_of = r.bucket_of, *local_of = r.local_of;
  const int64_t B = static_cast<int64_t>(w13.size());
  at::Tensor acc = at::zeros({T, H}, x.options().dtype(at::kFloat));
  float* accp = acc.data_ptr<float>();
  std::vector<std::vector<int64_t>> pairs(B);
  for (int64_t p = 0; p < T * K; ++p) {
    const int64_t e = id[p];
    TORCH_CHECK(e >= 0 && e < E, "expert id ", e, " out of range");
    if (bucket_of[e] >= 0) pairs[bucket_of[e]].push_back(p);  // width 0: exactly zero
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "heapr_zentorch_bucketed_moe", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    for (int64_t b = 0; b < B; ++b) {
      const std::vector<int64_t>& ps = pairs[b];
      const int64_t n = static_cast<int64_t>(ps.size());
      if (n == 0) continue;
      bool one = true;
      for (int64_t j = 1; j < n && one; ++j) one = local_of[id[ps[j]]] == local_of[id[ps[0]]];
      const int64_t rows_n = n + (one ? 1 : 0);
      at::Tensor rows = at::empty({rows_n, H}, x.options());
      at::Tensor loc = at::empty({rows_n, 1}, ids.options().dtype(at::kInt));
      at::Tensor w = at::empty({rows_n, 1}, wts.options());
      scalar_t* rp = rows.data_ptr<scalar_t>();
      int32_t* lp = loc.data_ptr<int32_t>();
      float* wp = w.data_ptr<float>();
      for (int64_t j = 0; j < n; ++j) {
        std::memcpy(rp + j * H, xp + (ps[j] / K) * H, H * sizeof(scalar_t));
        lp[j] = local_of[id[ps[j]]];
        wp[j] = wt[ps[j]];
      }
      if (one) {  // a weight-0 row of the same token on the bucket's next slot
        std::memcpy(rp + n * H, rp, H * sizeof(scalar_t));
        lp[n] = (lp[0] + 1) % static_cast<int32_t>(w13[b].size(0));
        wp[n] = 0.f;
      }
      at::Tensor y = at::empty({rows_n, H}, x.options());
      torch::jit::Stack stack;
      stack.reserve(13);
      stack.emplace_back(y);
      stack.emplace_back(rows);
      stack.emplace_back(w13[b]);
      stack.emplace_back(w2[b]);
      stack.emplace_back(c10::IValue());
      stack.emplace_back(c10::IValue());
      stack.emplace_back(w);
      stack.emplace_back(loc);
      stack.emplace_back(false);
      stack.emplace_back(act);
      stack.emplace_back(s13[b]);
      stack.emplace_back(s2[b]);
      stack.emplace_back(std::string("zentorch::zentorch_fused_moe"));
      zentorch_kernel().callBoxed(&stack);
      const scalar_t* yp = y.data_ptr<scalar_t>();
      for (int64_t j = 0; j < n; ++j) add_rows(accp + (ps[j] / K) * H, yp + j * H, H);
    }
  });
  return acc.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY(heapr_cpu, m) {
  m.def("sliced_moe(Tensor x, Tensor topk_weights, Tensor topk_ids, Tensor start, Tensor count, "
        "Tensor w13, Tensor w2, int zero, str act, str isa) -> Tensor");
  m.def("bucketed_moe(Tensor x, Tensor topk_weights, Tensor topk_ids, Tensor bucket_of, Tensor local_of, "
        "Tensor[] w13, Tensor[] w2, str act, str isa) -> Tensor");
  m.def("zentorch_bucketed_moe(Tensor x, Tensor topk_weights, Tensor topk_ids, Tensor bucket_of, Tensor local_of, "
        "Tensor[] w13, Tensor[] w2, Tensor[] s13, Tensor[] s2, str act) -> Tensor");
}

TORCH_LIBRARY_IMPL(heapr_cpu, CPU, m) {
  m.impl("bucketed_moe", &bucketed_moe);
  m.impl("sliced_moe", &sliced_moe);
  m.impl("zentorch_bucketed_moe", &zentorch_bucketed_moe);
}
