// Bindings of the aggregation and privacy kernels: array checks, GIL release, conversions.
// The math lives in cpp/src/aggregate.cpp and cpp/src/privacy.cpp.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

#include "bindings.hpp"
#include "fedrecon/aggregate.hpp"
#include "fedrecon/privacy.hpp"

namespace py = pybind11;
using namespace pybind11::literals;

namespace {

using fedrecon_bindings::Array;
using fedrecon_bindings::fail;

// Data pointers of float32 arrays that must each hold `size` values.
std::vector<const float*> dense_pointers(const std::vector<Array<float>>& updates, py::ssize_t size) {
  if (size < 0) fail("size must be >= 0");
  std::vector<const float*> ptrs;
  ptrs.reserve(updates.size());
  for (const auto& a : updates) {
    if (a.size() != size) fail("updates must all hold `size` values");
    ptrs.push_back(a.data());
  }
  return ptrs;
}

const double* weights_of(const Array<double>& weights, py::ssize_t n) {
  if (weights.ndim() != 1 || weights.shape(0) != n) fail("weights must have shape (number of updates,)");
  return weights.data();
}

fedrecon::SparseRows sparse_rows(const Array<std::int64_t>& offsets, const Array<std::int32_t>& rows,
                                 const Array<float>& values) {
  if (offsets.ndim() != 1 || offsets.shape(0) < 1) fail("offsets must be 1-D with num_clients + 1 entries");
  if (rows.ndim() != 1) fail("rows must be 1-D");
  if (values.ndim() != 2 || values.shape(0) != rows.shape(0))
    fail("values must have shape (len(rows), dim)");
  if (offsets.at(offsets.shape(0) - 1) != rows.shape(0)) fail("offsets must end at len(rows)");
  fedrecon::SparseRows u;
  u.offsets = offsets.data();
  u.rows = rows.data();
  u.values = values.data();
  u.num_clients = offsets.shape(0) - 1;
  u.dim = values.shape(1);
  return u;
}

// Fills a float32 or float64 result through a typed pointer with the GIL released: into `out`
// when given (exact dtype, C-contiguous, writeable, prod(shape) values; never copied), else
// into a new array of `shape`.
template <class T, class Fn>
py::array fill_output(std::vector<py::ssize_t> shape, const py::object& out, Fn& fill) {
  py::ssize_t size = 1;
  for (auto d : shape) size *= d;
  if (!out.is_none()) {
    if (!py::isinstance<Array<T>>(out))
      fail(std::string("out must be a C-contiguous ") + (sizeof(T) == 8 ? "float64" : "float32") + " array");
    auto arr = py::reinterpret_borrow<Array<T>>(out);
    if (arr.size() != size) fail("out must hold " + std::to_string(size) + " values");
    if (!arr.writeable()) fail("out must be writeable");
    T* p = arr.mutable_data();
    {
      py::gil_scoped_release release;
      fill(p);
    }
    return std::move(arr);
  }
  Array<T> arr(shape);
  T* p = arr.mutable_data();
  {
    py::gil_scoped_release release;
    fill(p);
  }
  return std::move(arr);
}

template <class Fn>
py::array typed_output(std::vector<py::ssize_t> shape, bool float64, const py::object& out, Fn&& fill) {
  return float64 ? fill_output<double>(std::move(shape), out, fill) : fill_output<float>(std::move(shape), out, fill);
}

py::dict summary_dict(const fedrecon::DpSummary& s, const fedrecon::DpParams& p) {
  return py::dict("num_updates"_a = s.num_updates, "num_clipped"_a = s.num_clipped,
                  "total_weight"_a = s.total_weight, "noise_std"_a = s.noise_std, "clip"_a = p.clip,
                  "noise_multiplier"_a = p.noise_multiplier);
}

fedrecon::DpParams dp_params(double clip, double noise_multiplier, std::uint64_t seed, std::uint64_t round) {
  fedrecon::DpParams p;
  p.clip = clip;
  p.noise_multiplier = noise_multiplier;
  p.seed = seed;
  p.round = round;
  return p;
}

// Streaming objects with a lock: the kernels run with the GIL released, so two Python threads
// could otherwise call into the same accumulator at once.
struct PyWeightedSum {
  PyWeightedSum(std::int64_t num_rows, std::int64_t dim) : sum(num_rows, dim) {}
  fedrecon::WeightedSum sum;
  std::mutex mutex;
};

struct PyGaussianSum {
  PyGaussianSum(std::int64_t num_rows, std::int64_t dim, const fedrecon::DpParams& p) : sum(num_rows, dim, p) {}
  fedrecon::GaussianSum sum;
  std::mutex mutex;
};

void check_dense_update(const Array<float>& x, std::int64_t num_rows, std::int64_t dim) {
  if (x.size() != num_rows * dim) fail("update must hold num_rows * dim values");
}

void check_sparse_update(const Array<std::int32_t>& rows, const Array<float>& values, std::int64_t dim) {
  if (rows.ndim() != 1) fail("rows must be 1-D");
  if (values.ndim() != 2 || values.shape(0) != rows.shape(0) || values.shape(1) != dim)
    fail("values must have shape (len(rows), dim)");
}

}  // namespace

void bind_aggregation(py::module_& m) {
  m.def(
      "weighted_mean_dense",
      [](const std::vector<Array<float>>& updates, py::ssize_t size, const Array<double>& weights, bool float64,
         int num_threads, const py::object& out) {
        const auto ptrs = dense_pointers(updates, size);
        const double* w = weights_of(weights, static_cast<py::ssize_t>(ptrs.size()));
        const auto n = static_cast<std::int64_t>(ptrs.size());
        double total = 0.0;
        py::array result = typed_output({size}, float64, out, [&](auto* p) {
          total = fedrecon::weighted_mean_dense(ptrs.data(), w, n, size, p, num_threads);
        });
        return py::make_tuple(result, total);
      },
      "updates"_a.noconvert(), "size"_a, "weights"_a.noconvert(), "float64"_a, "num_threads"_a, "out"_a = py::none());

  m.def(
      "weighted_mean_sparse",
      [](const Array<std::int64_t>& offsets, const Array<std::int32_t>& rows, const Array<float>& values,
         const Array<double>& weights, std::int64_t num_rows, bool float64, int num_threads, const py::object& out) {
        const auto u = sparse_rows(offsets, rows, values);
        const double* w = weights_of(weights, u.num_clients);
        double total = 0.0;
        py::array result = typed_output({num_rows, u.dim}, float64, out, [&](auto* p) {
          total = fedrecon::weighted_mean_sparse(u, w, num_rows, p, num_threads);
        });
        return py::make_tuple(result, total);
      },
      "offsets"_a.noconvert(), "rows"_a.noconvert(), "values"_a.noconvert(), "weights"_a.noconvert(),
      "num_rows"_a, "float64"_a, "num_threads"_a, "out"_a = py::none());

  py::class_<PyWeightedSum>(m, "WeightedSum", py::module_local())
      .def(py::init<std::int64_t, std::int64_t>(), "num_rows"_a, "dim"_a)
      .def(
          "add_dense",
          [](PyWeightedSum& s, const Array<float>& x, double coef, double weight, int num_threads) {
            check_dense_update(x, s.sum.num_rows(), s.sum.dim());
            const float* p = x.data();
            py::gil_scoped_release release;
            std::lock_guard<std::mutex> lock(s.mutex);
            s.sum.add_dense(p, coef, weight, num_threads);
          },
          "x"_a.noconvert(), "coef"_a, "weight"_a, "num_threads"_a)
      .def(
          "add_sparse",
          [](PyWeightedSum& s, const Array<std::int32_t>& rows, const Array<float>& values, double coef,
             double weight) {
            check_sparse_update(rows, values, s.sum.dim());
            const std::int32_t* r = rows.data();
            const float* v = values.data();
            const std::int64_t n = rows.shape(0);
            py::gil_scoped_release release;
            std::lock_guard<std::mutex> lock(s.mutex);
            s.sum.add_sparse(r, v, n, coef, weight);
          },
          "rows"_a.noconvert(), "values"_a.noconvert(), "coef"_a, "weight"_a)
      .def(
          "mean",
          [](PyWeightedSum& s, bool float64, int num_threads, const py::object& out) {
            return typed_output({s.sum.num_rows(), s.sum.dim()}, float64, out, [&](auto* p) {
              std::lock_guard<std::mutex> lock(s.mutex);
              s.sum.mean(p, num_threads);
            });
          },
          "float64"_a, "num_threads"_a, "out"_a = py::none())
      .def(
          "sum",
          [](PyWeightedSum& s, bool float64, int num_threads, const py::object& out) {
            return typed_output({s.sum.num_rows(), s.sum.dim()}, float64, out, [&](auto* p) {
              std::lock_guard<std::mutex> lock(s.mutex);
              s.sum.finalize(fedrecon::Finalize(), p, num_threads);
            });
          },
          "float64"_a, "num_threads"_a, "out"_a = py::none())
      .def("reset",
           [](PyWeightedSum& s) {
             std::lock_guard<std::mutex> lock(s.mutex);
             s.sum.reset();
           })
      .def_property_readonly("num_rows", [](PyWeightedSum& s) { return s.sum.num_rows(); })
      .def_property_readonly("dim", [](PyWeightedSum& s) { return s.sum.dim(); })
      .def_property_readonly("num_updates",
                             [](PyWeightedSum& s) {
                               std::lock_guard<std::mutex> lock(s.mutex);
                               return s.sum.num_updates();
                             })
      .def_property_readonly("total_weight",
                             [](PyWeightedSum& s) {
                               std::lock_guard<std::mutex> lock(s.mutex);
                               return s.sum.total_weight();
                             })
      .def_property_readonly("rows_held", [](PyWeightedSum& s) {
        std::lock_guard<std::mutex> lock(s.mutex);
        return s.sum.rows_held();
      });

  m.def("noise_key", &fedrecon::noise_key, "seed"_a, "round"_a);

  m.def(
      "gaussian_noise",
      [](std::int64_t size, double stddev, std::uint64_t seed, std::uint64_t round, int num_threads) {
        if (size < 0) fail("size must be >= 0");
        Array<double> out(size);
        double* p = out.mutable_data();
        {
          py::gil_scoped_release release;
          fedrecon::gaussian_noise(fedrecon::noise_key(seed, round), stddev, size, p, num_threads);
        }
        return out;
      },
      "size"_a, "std"_a, "seed"_a, "round"_a, "num_threads"_a);

  m.def(
      "squared_norm",
      [](const Array<float>& x, int num_threads) {
        const float* p = x.data();
        const std::int64_t n = x.size();
        py::gil_scoped_release release;
        return fedrecon::squared_norm(p, n, num_threads);
      },
      "x"_a.noconvert(), "num_threads"_a);

  m.def(
      "clip_by_norm",
      [](const Array<float>& x, double clip, int num_threads) {
        std::vector<py::ssize_t> shape(x.shape(), x.shape() + x.ndim());
        Array<float> out(shape);
        const float* src = x.data();
        float* dst = out.mutable_data();
        const std::int64_t n = x.size();
        double norm = 0.0;
        {
          py::gil_scoped_release release;
          norm = fedrecon::clip_by_norm(src, n, clip, dst, num_threads);
        }
        return py::make_tuple(out, norm);
      },
      "x"_a.noconvert(), "clip"_a, "num_threads"_a);

  m.def(
      "dp_sum_dense",
      [](const std::vector<Array<float>>& updates, py::ssize_t size, const Array<double>& weights,
         double clip, double noise_multiplier, std::uint64_t seed, std::uint64_t round, double denominator,
         bool float64, int num_threads, const py::object& out) {
        const auto ptrs = dense_pointers(updates, size);
        const auto n = static_cast<std::int64_t>(ptrs.size());
        const double* w = weights_of(weights, n);
        const auto p = dp_params(clip, noise_multiplier, seed, round);
        Array<double> norms(n);
        double* norms_ptr = norms.mutable_data();
        fedrecon::DpSummary s;
        py::array result = typed_output({size}, float64, out, [&](auto* o) {
          s = fedrecon::dp_sum_dense(ptrs.data(), w, n, size, p, denominator, o, norms_ptr, num_threads);
        });
        return py::make_tuple(result, norms, summary_dict(s, p));
      },
      "updates"_a.noconvert(), "size"_a, "weights"_a.noconvert(), "clip"_a, "noise_multiplier"_a, "seed"_a, "round"_a,
      "denominator"_a, "float64"_a, "num_threads"_a, "out"_a = py::none());

  m.def(
      "dp_sum_sparse",
      [](const Array<std::int64_t>& offsets, const Array<std::int32_t>& rows, const Array<float>& values,
         const Array<double>& weights, std::int64_t num_rows, double clip, double noise_multiplier,
         std::uint64_t seed, std::uint64_t round, double denominator, bool float64, int num_threads, const py::object& out) {
        const auto u = sparse_rows(offsets, rows, values);
        const double* w = weights_of(weights, u.num_clients);
        const auto p = dp_params(clip, noise_multiplier, seed, round);
        Array<double> norms(u.num_clients);
        double* norms_ptr = norms.mutable_data();
        fedrecon::DpSummary s;
        py::array result = typed_output({num_rows, u.dim}, float64, out, [&](auto* o) {
          s = fedrecon::dp_sum_sparse(u, w, num_rows, p, denominator, o, norms_ptr, num_threads);
        });
        return py::make_tuple(result, norms, summary_dict(s, p));
      },
      "offsets"_a.noconvert(), "rows"_a.noconvert(), "values"_a.noconvert(), "weights"_a.noconvert(),
      "num_rows"_a, "clip"_a, "noise_multiplier"_a, "seed"_a, "round"_a, "denominator"_a, "float64"_a,
      "num_threads"_a, "out"_a = py::none());

  py::class_<PyGaussianSum>(m, "GaussianSum", py::module_local())
      .def(py::init([](std::int64_t num_rows, std::int64_t dim, double clip, double noise_multiplier,
                       std::uint64_t seed, std::uint64_t round) {
             return new PyGaussianSum(num_rows, dim, dp_params(clip, noise_multiplier, seed, round));
           }),
           "num_rows"_a, "dim"_a, "clip"_a, "noise_multiplier"_a, "seed"_a, "round"_a)
      .def(
          "add_dense",
          [](PyGaussianSum& s, const Array<float>& x, double weight, int num_threads) {
            check_dense_update(x, s.sum.sum().num_rows(), s.sum.sum().dim());
            const float* p = x.data();
            py::gil_scoped_release release;
            std::lock_guard<std::mutex> lock(s.mutex);
            return s.sum.add_dense(p, weight, num_threads);
          },
          "x"_a.noconvert(), "weight"_a, "num_threads"_a)
      .def(
          "add_sparse",
          [](PyGaussianSum& s, const Array<std::int32_t>& rows, const Array<float>& values, double weight,
             int num_threads) {
            check_sparse_update(rows, values, s.sum.sum().dim());
            const std::int32_t* r = rows.data();
            const float* v = values.data();
            const std::int64_t n = rows.shape(0);
            py::gil_scoped_release release;
            std::lock_guard<std::mutex> lock(s.mutex);
            return s.sum.add_sparse(r, v, n, weight, num_threads);
          },
          "rows"_a.noconvert(), "values"_a.noconvert(), "weight"_a, "num_threads"_a)
      .def(
          "finalize",
          [](PyGaussianSum& s, double denominator, bool float64, int num_threads, const py::object& out) {
            return typed_output({s.sum.sum().num_rows(), s.sum.sum().dim()}, float64, out, [&](auto* p) {
              std::lock_guard<std::mutex> lock(s.mutex);
              s.sum.finalize(denominator, p, num_threads);
            });
          },
          "denominator"_a, "float64"_a, "num_threads"_a, "out"_a = py::none())
      .def("reset",
           [](PyGaussianSum& s) {
             std::lock_guard<std::mutex> lock(s.mutex);
             s.sum.reset();
           })
      .def("summary", [](PyGaussianSum& s) {
        std::lock_guard<std::mutex> lock(s.mutex);
        return summary_dict(s.sum.summary(), s.sum.params());
      });
}
