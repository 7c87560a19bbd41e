// The routed experts of the MoE layer for training on CPU: forward and backward of
//
//   out[t] = sum_k gate[t,k] * W2_e (silu(W1_e x_t) * (W3_e x_t)),  e = expert[t,k]
//
// with the gather of each token's rows, the SwiGLU, the gate and the combine fused around
// the per-expert GEMMs (ATen's, i.e. MKL/oneDNN). Experts run in parallel, one thread
// each, so every GEMM works on one expert's rows while they sit in that core's cache:
// the gathered rows and the hidden activations live per expert, and the only buffers of
// size (slots x model dim) are the expert outputs (forward) and the per-slot input
// gradients (backward) that the combine sums per token.
// The eager reference is pipeline/model/moe.py (MoE with dispatch "grouped" or "loop");
// tests/model/test_moe_kernel_train.py checks values and every gradient against it.
//
// Names: T tokens, D model dim, E experts, F expert hidden width, K top-k, N = T*K slots.
// order_N lists the flat slot ids (t*K + k) sorted by expert, offsets_E1 the start of
// each expert's run of sorted slots (E+1 entries, the last N).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

namespace {

void check_inputs(const at::Tensor& x_TD, const at::Tensor& gates_TK, const at::Tensor& w1_EFD,
                  const at::Tensor& w3_EFD, const at::Tensor& w2_EDF, const at::Tensor& order_N,
                  const at::Tensor& offsets_E1) {
  for (const auto* t : {&x_TD, &gates_TK, &w1_EFD, &w3_EFD, &w2_EDF, &order_N, &offsets_E1}) {
    TORCH_CHECK(t->device().is_cpu(), "moe_train: CPU tensors only");
  }
  TORCH_CHECK(x_TD.dim() == 2 && gates_TK.dim() == 2 && w1_EFD.dim() == 3 && w2_EDF.dim() == 3,
              "moe_train: x (T, D), gates (T, K), w1/w3 (E, F, D), w2 (E, D, F)");
  TORCH_CHECK(x_TD.scalar_type() == at::kFloat || x_TD.scalar_type() == at::kDouble,
              "moe_train: float32 or float64 only, got ", x_TD.scalar_type());
  TORCH_CHECK(x_TD.scalar_type() == gates_TK.scalar_type() && x_TD.scalar_type() == w1_EFD.scalar_type() &&
                  x_TD.scalar_type() == w3_EFD.scalar_type() && x_TD.scalar_type() == w2_EDF.scalar_type(),
              "moe_train: activations, gates and weights must share one dtype");
  TORCH_CHECK(w3_EFD.sizes() == w1_EFD.sizes(), "moe_train: w3 must have w1's shape");
  TORCH_CHECK(w1_EFD.size(2) == x_TD.size(1) && w2_EDF.size(0) == w1_EFD.size(0) && w2_EDF.size(1) == x_TD.size(1) &&
                  w2_EDF.size(2) == w1_EFD.size(1),
              "moe_train: weight shapes");
  TORCH_CHECK(order_N.scalar_type() == at::kLong && offsets_E1.scalar_type() == at::kLong && order_N.is_contiguous() &&
                  offsets_E1.is_contiguous(),
              "moe_train: order and offsets are contiguous int64 (from sort_slots)");
  TORCH_CHECK(gates_TK.size(0) == x_TD.size(0) && order_N.numel() == gates_TK.numel(), "moe_train: slot count");
  TORCH_CHECK(offsets_E1.numel() == w1_EFD.size(0) + 1, "moe_train: offsets need E+1 entries");
  // Bad offsets or order would read and write out of bounds: checked, O(E + N).
  const int64_t* offsets = offsets_E1.data_ptr<int64_t>();
  TORCH_CHECK(offsets[0] == 0 && offsets[w1_EFD.size(0)] == order_N.numel(), "moe_train: offsets must run 0..N");
  for (int64_t e = 0; e < w1_EFD.size(0); ++e) {
    TORCH_CHECK(offsets[e] <= offsets[e + 1], "moe_train: offsets must not decrease");
  }
}

// body(e) for every expert, the experts shared out over the threads by their slot counts
// (greedy: the largest next, to the least loaded thread). A contiguous split, what
// at::parallel_for(0, E) does, leaves one thread waiting whenever routing is uneven
// between the halves. Which thread runs an expert changes nothing in its result.
template <typename Body>
void for_each_expert(const int64_t* offsets, int64_t E, const Body& body) {
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), E));
  std::vector<int64_t> by_rows(E);
  std::iota(by_rows.begin(), by_rows.end(), 0);
  auto rows = [&](int64_t e) { return offsets[e + 1] - offsets[e]; };
  std::stable_sort(by_rows.begin(), by_rows.end(), [&](int64_t a, int64_t b) { return rows(a) > rows(b); });
  std::vector<std::vector<int64_t>> share(threads);
  std::vector<int64_t> load(threads, 0);
  for (int64_t e : by_rows) {
    const auto least = std::min_element(load.begin(), load.end()) - load.begin();
    share[least].push_back(e);
    load[least] += rows(e) + 1;  // + 1: an expert without rows still costs a call
  }
  at::parallel_for(0, threads, 1, [&](int64_t t0, int64_t t1) {
    // Thread-local state does not reach parallel_for's other threads: without this the
    // out= GEMMs into views of tensors made under inference_mode fail there.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    for (int64_t t = t0; t < t1; ++t) {
      for (int64_t e : share[t]) body(e);
    }
  });
}

// rows_ND[r] = sum over the K slots of token t of slots_ND[position of slot], for each t:
// the combine of the forward and the gather-sum of the input gradient (no write conflicts).
template <typename scalar_t>
void sum_slots(const scalar_t* slots_ND, const int64_t* position_N, int64_t T, int64_t K, int64_t D,
               scalar_t* rows_TD) {
  at::parallel_for(0, T, 64, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      scalar_t* row = rows_TD + t * D;
      const scalar_t* first = slots_ND + position_N[t * K] * D;
      for (int64_t d = 0; d < D; ++d) row[d] = first[d];
      for (int64_t k = 1; k < K; ++k) {
        const scalar_t* src = slots_ND + position_N[t * K + k] * D;
        for (int64_t d = 0; d < D; ++d) row[d] += src[d];
      }
    }
  });
}

at::Tensor positions(const at::Tensor& order_N) {
  // position_N[slot] = where that slot sits in the sorted order (the inverse permutation);
  // an order that is not a permutation of 0..N-1 is refused.
  const int64_t N = order_N.numel();
  auto position_N = at::full({N}, -1, order_N.options());
  const int64_t* order = order_N.data_ptr<int64_t>();
  int64_t* position = position_N.data_ptr<int64_t>();
  for (int64_t r = 0; r < N; ++r) {
    TORCH_CHECK(order[r] >= 0 && order[r] < N && position[order[r]] < 0,
                "moe_train: order must be a permutation of the slots (from sort_slots)");
    position[order[r]] = r;
  }
  return position_N;
}

std::vector<at::Tensor> forward(const at::Tensor& x_TD_in, const at::Tensor& gates_TK_in, const at::Tensor& w1_EFD_in,
                                const at::Tensor& w3_EFD_in, const at::Tensor& w2_EDF_in, const at::Tensor& order_N,
                                const at::Tensor& offsets_E1) {
  check_inputs(x_TD_in, gates_TK_in, w1_EFD_in, w3_EFD_in, w2_EDF_in, order_N, offsets_E1);
  // Detached: the Python autograd.Function owns the graph, and ATen's out= kernels refuse
  // inputs that require grad (in every thread of the parallel region).
  auto x_TD = x_TD_in.detach().contiguous(), gates_TK = gates_TK_in.detach().contiguous();
  auto w1_EFD = w1_EFD_in.detach().contiguous(), w3_EFD = w3_EFD_in.detach().contiguous();
  auto w2_EDF = w2_EDF_in.detach().contiguous();
  const int64_t T = x_TD.size(0), D = x_TD.size(1), K = gates_TK.size(1), N = T * K;
  const int64_t E = w1_EFD.size(0), F = w1_EFD.size(1);
  auto h1_NF = at::empty({N, F}, x_TD.options());  // saved for the backward
  auto h3_NF = at::empty({N, F}, x_TD.options());
  auto y_ND = at::empty({N, D}, x_TD.options());  // gated expert outputs, sorted order
  const int64_t* offsets = offsets_E1.data_ptr<int64_t>();
  const auto gates_N = gates_TK.view(-1);
  auto position_N = positions(order_N);
  for_each_expert(offsets, E, [&](int64_t e) {
    const int64_t start = offsets[e], n = offsets[e + 1] - start;
    if (n == 0) return;
    auto slots_n = order_N.narrow(0, start, n);
    auto tokens_n = at::floor_divide(slots_n, K);
    auto x_nD = x_TD.index_select(0, tokens_n);
    auto h1_nF = h1_NF.narrow(0, start, n), h3_nF = h3_NF.narrow(0, start, n);
    at::mm_out(h1_nF, x_nD, w1_EFD[e].t());
    at::mm_out(h3_nF, x_nD, w3_EFD[e].t());
    // gate * silu(h1) * h3 through ATen's vectorised kernels (one thread here: the
    // experts are the parallel loop), on rows that are still in cache.
    auto a_nF = at::silu(h1_nF).mul_(h3_nF).mul_(gates_N.index_select(0, slots_n).unsqueeze(1));
    auto y_nD = y_ND.narrow(0, start, n);
    at::mm_out(y_nD, a_nF, w2_EDF[e].t());
  });
  auto out_TD = at::empty({T, D}, x_TD.options());
  AT_DISPATCH_FLOATING_TYPES(x_TD.scalar_type(), "moe_train_combine", [&] {
    sum_slots<scalar_t>(y_ND.data_ptr<scalar_t>(), position_N.data_ptr<int64_t>(), T, K, D,
                        out_TD.data_ptr<scalar_t>());
  });
  return {out_TD, h1_NF, h3_NF};
}

// Returns d x_TD, d gates_TK, d w1_EFD, d w3_EFD, d w2_EDF.
std::vector<at::Tensor> backward(const at::Tensor& dout_TD_in, const at::Tensor& x_TD_in, const at::Tensor& gates_TK_in,
                                 const at::Tensor& w1_EFD_in, const at::Tensor& w3_EFD_in, const at::Tensor& w2_EDF_in,
                                 const at::Tensor& order_N, const at::Tensor& offsets_E1, const at::Tensor& h1_NF,
                                 const at::Tensor& h3_NF) {
  check_inputs(x_TD_in, gates_TK_in, w1_EFD_in, w3_EFD_in, w2_EDF_in, order_N, offsets_E1);
  auto dout_TD = dout_TD_in.detach().contiguous(), x_TD = x_TD_in.detach().contiguous();
  auto gates_TK = gates_TK_in.detach().contiguous();
  auto w1_EFD = w1_EFD_in.detach().contiguous(), w3_EFD = w3_EFD_in.detach().contiguous();
  auto w2_EDF = w2_EDF_in.detach().contiguous();
  const int64_t T = x_TD.size(0), D = x_TD.size(1), K = gates_TK.size(1), N = T * K;
  const int64_t E = w1_EFD.size(0);
  // Every expert's slice is written below (zeroed when it has no slots): no memset of
  // the whole E x F x D gradients, which at the paper's sizes is hundreds of MB a step.
  auto dw1_EFD = at::empty_like(w1_EFD), dw3_EFD = at::empty_like(w3_EFD), dw2_EDF = at::empty_like(w2_EDF);
  auto dgates_TK = at::empty_like(gates_TK);
  auto dx_ND = at::empty({N, D}, x_TD.options());  // each slot's input gradient, sorted order
  const int64_t* offsets = offsets_E1.data_ptr<int64_t>();
  const auto gates_N = gates_TK.view(-1);
  auto dgates_sorted_N = at::empty({N}, x_TD.options());  // per sorted slot; scattered after the loop
  auto position_N = positions(order_N);
  for_each_expert(offsets, E, [&](int64_t e) {
    const int64_t start = offsets[e], n = offsets[e + 1] - start;
    if (n == 0) {
      dw1_EFD[e].zero_(), dw3_EFD[e].zero_(), dw2_EDF[e].zero_();
      return;
    }
    auto slots_n = order_N.narrow(0, start, n);
    auto tokens_n = at::floor_divide(slots_n, K);
    auto dy_nD = dout_TD.index_select(0, tokens_n);
    auto g_n1 = gates_N.index_select(0, slots_n).unsqueeze(1);
    auto h1_nF = h1_NF.narrow(0, start, n), h3_nF = h3_NF.narrow(0, start, n);
    auto dg_nF = at::mm(dy_nD, w2_EDF[e]);  // d loss / d (gate * silu(h1) * h3)
    auto silu_nF = at::silu(h1_nF);
    auto a_nF = silu_nF * h3_nF;
    dgates_sorted_N.narrow(0, start, n).copy_((dg_nF * a_nF).sum(1));
    auto s_nF = a_nF.mul_(g_n1);  // the forward's gated activations, recomputed
    auto da_nF = dg_nF.mul_(g_n1);
    auto dh3_nF = da_nF * silu_nF;
    auto dh1_nF = at::silu_backward(da_nF.mul_(h3_nF), h1_nF);
    auto dw2_DF = dw2_EDF[e], dw1_FD = dw1_EFD[e], dw3_FD = dw3_EFD[e];
    at::mm_out(dw2_DF, dy_nD.t(), s_nF);
    auto x_nD = x_TD.index_select(0, tokens_n);
    at::mm_out(dw1_FD, dh1_nF.t(), x_nD);
    at::mm_out(dw3_FD, dh3_nF.t(), x_nD);
    auto dx_nD = dx_ND.narrow(0, start, n);
    at::mm_out(dx_nD, dh1_nF, w1_EFD[e]);
    dx_nD.addmm_(dh3_nF, w3_EFD[e]);
  });
  dgates_TK.view(-1).index_copy_(0, order_N, dgates_sorted_N);
  auto dx_TD = at::empty({T, D}, x_TD.options());
  AT_DISPATCH_FLOATING_TYPES(x_TD.scalar_type(), "moe_train_dx", [&] {
    sum_slots<scalar_t>(dx_ND.data_ptr<scalar_t>(), position_N.data_ptr<int64_t>(), T, K, D,
                        dx_TD.data_ptr<scalar_t>());
  });
  return {dx_TD, dgates_TK, dw1_EFD, dw3_EFD, dw2_EDF};
}

// Stable counting sort of the slots by expert: order_N (flat slot ids) and offsets_E1.
std::vector<at::Tensor> sort_slots(const at::Tensor& experts_TK_in, int64_t num_experts) {
  TORCH_CHECK(experts_TK_in.scalar_type() == at::kLong && experts_TK_in.device().is_cpu(),
              "moe_train: expert ids are int64 on the CPU");
  auto experts_N = experts_TK_in.contiguous().view(-1);
  const int64_t N = experts_N.numel();
  const int64_t* expert = experts_N.data_ptr<int64_t>();
  auto offsets_E1 = at::zeros({num_experts + 1}, experts_N.options());
  int64_t* offsets = offsets_E1.data_ptr<int64_t>();
  for (int64_t i = 0; i < N; ++i) {
    TORCH_CHECK(expert[i] >= 0 && expert[i] < num_experts, "moe_train: expert id ", expert[i], " out of range");
    ++offsets[expert[i] + 1];
  }
  for (int64_t e = 0; e < num_experts; ++e) offsets[e + 1] += offsets[e];
  auto order_N = at::empty({N}, experts_N.options());
  int64_t* order = order_N.data_ptr<int64_t>();
  std::vector<int64_t> next(offsets, offsets + num_experts);
  for (int64_t i = 0; i < N; ++i) order[next[expert[i]]++] = i;
  return {order_N, offsets_E1};
}

}  // namespace

TORCH_LIBRARY(mobilemoe_train, m) {
  m.def("moe_forward(Tensor x, Tensor gates, Tensor w1, Tensor w3, Tensor w2, Tensor order, Tensor offsets) -> Tensor[]");
  m.def(
      "moe_backward(Tensor dout, Tensor x, Tensor gates, Tensor w1, Tensor w3, Tensor w2, Tensor order, "
      "Tensor offsets, Tensor h1, Tensor h3) -> Tensor[]");
  m.def("sort_slots(Tensor experts, int num_experts) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(mobilemoe_train, CPU, m) {
  m.impl("moe_forward", &forward);
  m.impl("moe_backward", &backward);
  m.impl("sort_slots", &sort_slots);
}
