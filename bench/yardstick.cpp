// The yardstick of issue 18: one FedRecon round of the paper recipe as the plain single-thread
// loops a careful engineer writes first (no threads, no determinism contract, no float64
// sums), compiled by bench/yardstick.py with the module's flags plus -ffast-math. The engine
// is timed against it on the same clients, splits and initial embeddings (bench/suite.py).
#include <algorithm>
#include <cstdint>
#include <vector>

using i64 = std::int64_t;

static float dot(const float* a, const float* b, int K) {
  float s = 0.0f;
  for (int k = 0; k < K; ++k) s += a[k] * b[k];
  return s;
}

// Batch b of a plan holds positions pos[off[b]:off[b+1]]; client i owns batches
// [first[i], first[i+1]). Positions index the client's ratings in the CSR arrays.
extern "C" void yardstick_round(float* V, i64 num_items, int K, const i64* indptr,
                                const std::int32_t* items, const float* ratings, const i64* clients,
                                i64 m, const float* u0, const i64* sup_pos, const i64* sup_off,
                                const i64* sup_first, const i64* qry_pos, const i64* qry_off,
                                const i64* qry_first, int recon_epochs, i64 recon_cap,
                                float recon_lr, int update_epochs, i64 update_cap, float client_lr,
                                float server_lr) {
  // Buffers live across calls (a training loop keeps them); delta and slot are left clean.
  static std::vector<float> delta, u, g, W, err;
  static std::vector<std::int32_t> slot, rows, local;
  if (delta.size() != static_cast<size_t>(num_items * K)) {
    delta.assign(static_cast<size_t>(num_items * K), 0.0f);
    slot.assign(static_cast<size_t>(num_items), -1);
  }
  u.resize(K);
  g.resize(K);
  double total = 0.0;
  for (i64 i = 0; i < m; ++i) {
    const i64 base = indptr[clients[i]];
    std::copy_n(u0 + i * K, K, u.begin());
    // Reconstruction: SGD on u over the support batches, V frozen.
    const i64 nb = sup_first[i + 1] - sup_first[i];
    i64 steps = nb * recon_epochs;
    if (recon_cap > 0) steps = std::min(steps, recon_cap);
    for (i64 s = 0; s < steps; ++s) {
      const i64 b = sup_first[i] + s % nb;
      std::fill(g.begin(), g.end(), 0.0f);
      for (i64 e = sup_off[b]; e < sup_off[b + 1]; ++e) {
        const float* v = V + static_cast<i64>(items[base + sup_pos[e]]) * K;
        const float r = dot(u.data(), v, K) - ratings[base + sup_pos[e]];
        for (int k = 0; k < K; ++k) g[k] += r * v[k];
      }
      const float c = recon_lr * 2.0f / static_cast<float>(sup_off[b + 1] - sup_off[b]);
      for (int k = 0; k < K; ++k) u[k] -= c * g[k];
    }
    // Client update: SGD on a local copy of the rows the executed query batches touch, u frozen.
    const i64 nq = qry_first[i + 1] - qry_first[i];
    i64 usteps = nq * update_epochs;
    if (update_cap > 0) usteps = std::min(usteps, update_cap);
    if (usteps == 0) continue;
    rows.clear();
    W.clear();
    const i64 used_end = qry_off[qry_first[i] + std::min(usteps, nq)];
    local.resize(static_cast<size_t>(used_end - qry_off[qry_first[i]]));
    for (i64 e = qry_off[qry_first[i]]; e < used_end; ++e) {
      const std::int32_t item = items[base + qry_pos[e]];
      if (slot[item] < 0) {
        slot[item] = static_cast<std::int32_t>(rows.size());
        rows.push_back(item);
        W.insert(W.end(), V + static_cast<i64>(item) * K, V + static_cast<i64>(item + 1) * K);
      }
      local[e - qry_off[qry_first[i]]] = slot[item];
    }
    for (i64 s = 0; s < usteps; ++s) {
      const i64 b = qry_first[i] + s % nq;
      const i64 lo = qry_off[b], hi = qry_off[b + 1];
      err.resize(static_cast<size_t>(hi - lo));
      for (i64 e = lo; e < hi; ++e)  // errors at the pre-step rows
        err[e - lo] = dot(u.data(), &W[local[e - qry_off[qry_first[i]]] * K], K) - ratings[base + qry_pos[e]];
      const float c = client_lr * 2.0f / static_cast<float>(hi - lo);
      for (i64 e = lo; e < hi; ++e) {
        float* w = &W[local[e - qry_off[qry_first[i]]] * K];
        for (int k = 0; k < K; ++k) w[k] -= c * err[e - lo] * u[k];
      }
    }
    // Weighted accumulation of W - V (weight: the query set's size).
    const float weight = static_cast<float>(qry_off[qry_first[i + 1]] - qry_off[qry_first[i]]);
    for (size_t l = 0; l < rows.size(); ++l) {
      const float* v = V + static_cast<i64>(rows[l]) * K;
      float* d = &delta[static_cast<size_t>(rows[l]) * K];
      for (int k = 0; k < K; ++k) d[k] += weight * (W[l * K + k] - v[k]);
      slot[rows[l]] = -1;
    }
    total += weight;
  }
  // Dense server step: V += lr * delta / total.
  if (total > 0.0) {
    const float c = server_lr / static_cast<float>(total);
    for (i64 k = 0; k < num_items * K; ++k) {
      V[k] += c * delta[static_cast<size_t>(k)];
      delta[static_cast<size_t>(k)] = 0.0f;
    }
  }
}
