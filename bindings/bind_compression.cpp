// Bindings of the quantization and wire-format kernels: array checks, GIL release, conversions.
// No math here. The public API is fedrecon_fast.compression.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#include "bindings.hpp"
#include "fedrecon/quantize.hpp"
#include "fedrecon/wire.hpp"

namespace py = pybind11;
using namespace pybind11::literals;

namespace {

using fedrecon_bindings::Array;
using fedrecon_bindings::fail;

fedrecon::QuantScheme make_scheme(int bits, bool row_scaling, bool hadamard, std::uint64_t key) {
  fedrecon::QuantScheme s;
  s.bits = bits;
  s.row_scaling = row_scaling;
  s.hadamard = hadamard;
  s.key = key;
  return s;
}

std::vector<std::int64_t> shape_of(const py::array& a, const char* name) {
  if (a.ndim() > fedrecon::kWireMaxNdim) fail(std::string(name) + " must have at most 8 dimensions");
  return std::vector<std::int64_t>(a.shape(), a.shape() + a.ndim());
}

std::vector<py::ssize_t> py_shape(const std::int64_t* shape, int ndim) {
  return std::vector<py::ssize_t>(shape, shape + ndim);
}

fedrecon::WireBuffer wire_buffer(const Array<std::uint8_t>& buf) {
  if (buf.ndim() != 1) fail("buf must be a 1-D uint8 array");
  return fedrecon::WireBuffer{buf.data(), static_cast<std::size_t>(buf.shape(0))};
}

// A bytes object of `size` bytes to be filled without the GIL (nobody else sees it yet).
py::bytes new_bytes(std::size_t size, std::uint8_t*& data) {
  py::bytes out(nullptr, size);
  data = reinterpret_cast<std::uint8_t*>(PyBytes_AS_STRING(out.ptr()));
  return out;
}

Array<float> quantize(const Array<float>& x, int bits, bool row_scaling, bool hadamard, std::uint64_t key,
                      int num_threads) {
  const auto shape = shape_of(x, "x");
  std::int64_t rows = 0, cols = 0;
  fedrecon::shape_rows_cols(shape.data(), static_cast<int>(shape.size()), rows, cols);
  Array<float> out(py_shape(shape.data(), static_cast<int>(shape.size())));
  const auto scheme = make_scheme(bits, row_scaling, hadamard, key);
  const float* src = x.data();
  float* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
    fedrecon::quantize_roundtrip(src, rows, cols, scheme, dst, num_threads, "x");
  }
  return out;
}

void quantize_accumulate(const Array<float>& x, int bits, bool row_scaling, bool hadamard, std::uint64_t key,
                         double weight, Array<double>& out, int num_threads) {
  const auto shape = shape_of(x, "x");
  const auto out_shape = shape_of(out, "out");
  if (shape != out_shape) fail("out must have the shape of x");
  if (!out.writeable()) fail("out must be writeable");
  std::int64_t rows = 0, cols = 0;
  fedrecon::shape_rows_cols(shape.data(), static_cast<int>(shape.size()), rows, cols);
  const auto scheme = make_scheme(bits, row_scaling, hadamard, key);
  const float* src = x.data();
  double* acc = out.mutable_data();
  py::gil_scoped_release release;
  fedrecon::quantize_accumulate(src, rows, cols, scheme, weight, acc, num_threads, "x");
}

py::bytes encode(const Array<float>& x, int bits, bool row_scaling, bool hadamard, std::uint64_t key,
                 int num_threads) {
  const auto shape = shape_of(x, "x");
  const int ndim = static_cast<int>(shape.size());
  const auto scheme = make_scheme(bits, row_scaling, hadamard, key);
  const std::size_t size = fedrecon::encoded_size(shape.data(), ndim, scheme);
  std::uint8_t* data = nullptr;
  py::bytes out = new_bytes(size, data);
  const float* src = x.data();
  {
    py::gil_scoped_release release;
    fedrecon::encode_dense(src, shape.data(), ndim, scheme, data, size, num_threads, "x");
  }
  return out;
}

py::bytes encode_sparse(const Array<std::int32_t>& rows, const Array<float>& values, std::int64_t num_rows, int bits,
                        bool row_scaling, bool hadamard, std::uint64_t key, int num_threads) {
  if (rows.ndim() != 1) fail("rows must be 1-D");
  if (values.ndim() != 2 || values.shape(0) != rows.shape(0))
    fail("values must be 2-D with one row per row id: (len(rows), cols)");
  const auto scheme = make_scheme(bits, row_scaling, hadamard, key);
  const std::int64_t table[2] = {num_rows, values.shape(1)};
  const std::size_t size = fedrecon::encoded_size(table, 2, scheme, rows.shape(0));
  std::uint8_t* data = nullptr;
  py::bytes out = new_bytes(size, data);
  const std::int32_t* ids = rows.data();
  const float* src = values.data();
  const std::int64_t n = rows.shape(0);
  const std::int64_t cols = values.shape(1);
  {
    py::gil_scoped_release release;
    fedrecon::encode_sparse(ids, n, num_rows, src, cols, scheme, data, size, num_threads, "values");
  }
  return out;
}

std::size_t encoded_size(const std::vector<std::int64_t>& shape, int bits, bool row_scaling, bool hadamard,
                         std::int64_t sparse_rows) {
  if (shape.size() > static_cast<std::size_t>(fedrecon::kWireMaxNdim)) fail("shape must have at most 8 entries");
  return fedrecon::encoded_size(shape.data(), static_cast<int>(shape.size()),
                                make_scheme(bits, row_scaling, hadamard, 0), sparse_rows);
}

fedrecon::WireHeader parse(const fedrecon::WireBuffer& b, int num_threads) {
  py::gil_scoped_release release;
  return fedrecon::parse_wire(b.data, b.size, num_threads);
}

py::dict buffer_info(const Array<std::uint8_t>& buf, int num_threads) {
  const auto h = parse(wire_buffer(buf), num_threads);
  py::tuple shape(h.ndim);
  for (int d = 0; d < h.ndim; ++d) shape[static_cast<std::size_t>(d)] = py::int_(h.shape[d]);
  return py::dict("version"_a = h.version, "dtype"_a = "float32", "bits"_a = h.scheme.bits,
                  "scaling"_a = h.scheme.row_scaling ? "row" : "tensor", "hadamard"_a = h.scheme.hadamard,
                  "sparse"_a = h.sparse, "shape"_a = shape,
                  "num_rows"_a = h.sparse ? py::object(py::int_(h.num_rows)) : py::object(py::none()),
                  "key"_a = h.scheme.key, "num_groups"_a = h.layout.num_groups,
                  "padded_cols"_a = h.layout.padded_cols, "payload_bytes"_a = h.payload_bytes,
                  "nbytes"_a = h.total_bytes);
}

Array<float> decode(const Array<std::uint8_t>& buf, int num_threads) {
  const auto b = wire_buffer(buf);
  const auto h = parse(b, num_threads);
  if (h.sparse) fail("buf holds a sparse row update: use decode_sparse");
  Array<float> out(py_shape(h.shape, h.ndim));
  float* dst = out.mutable_data();
  {
    py::gil_scoped_release release;
    fedrecon::decode_values(h, b.data, dst, num_threads);
  }
  return out;
}

py::tuple decode_sparse(const Array<std::uint8_t>& buf, int num_threads) {
  const auto b = wire_buffer(buf);
  const auto h = parse(b, num_threads);
  if (!h.sparse) fail("buf holds a dense array: use decode");
  Array<std::int32_t> rows(static_cast<py::ssize_t>(h.layout.rows));
  Array<float> values(py_shape(h.shape, h.ndim));
  std::int32_t* ids = rows.mutable_data();
  float* dst = values.mutable_data();
  {
    py::gil_scoped_release release;
    fedrecon::decode_rows(h, b.data, ids);
    fedrecon::decode_values(h, b.data, dst, num_threads);
  }
  return py::make_tuple(rows, values, py::int_(h.num_rows));
}

void decode_accumulate(const std::vector<Array<std::uint8_t>>& buffers, const Array<double>& weights,
                       Array<double>& out, int num_threads) {
  if (weights.ndim() != 1 || static_cast<std::size_t>(weights.shape(0)) != buffers.size())
    fail("weights must be 1-D with one weight per buffer");
  if (!out.writeable()) fail("out must be writeable");
  if (out.ndim() > fedrecon::kWireMaxNdim) fail("out must have at most 8 dimensions");
  std::vector<fedrecon::WireBuffer> bufs;
  bufs.reserve(buffers.size());
  for (const auto& b : buffers) bufs.push_back(wire_buffer(b));
  const auto shape = shape_of(out, "out");
  const double* w = weights.data();
  double* acc = out.mutable_data();
  py::gil_scoped_release release;
  fedrecon::decode_accumulate(bufs.data(), w, static_cast<std::int64_t>(bufs.size()), acc, shape.data(),
                              static_cast<int>(shape.size()), num_threads);
}

}  // namespace

void bind_compression(py::module_& m) {
  m.attr("WIRE_FORMAT_VERSION") = fedrecon::kWireVersion;
  m.def("quantize", &quantize, "x"_a.noconvert(), "bits"_a, "row_scaling"_a, "hadamard"_a, "key"_a,
        "num_threads"_a);
  m.def("quantize_accumulate", &quantize_accumulate, "x"_a.noconvert(), "bits"_a, "row_scaling"_a, "hadamard"_a,
        "key"_a, "weight"_a, "out"_a.noconvert(), "num_threads"_a);
  m.def("encode", &encode, "x"_a.noconvert(), "bits"_a, "row_scaling"_a, "hadamard"_a, "key"_a, "num_threads"_a);
  m.def("encode_sparse", &encode_sparse, "rows"_a.noconvert(), "values"_a.noconvert(), "num_rows"_a, "bits"_a,
        "row_scaling"_a, "hadamard"_a, "key"_a, "num_threads"_a);
  m.def("encoded_size", &encoded_size, "shape"_a, "bits"_a, "row_scaling"_a, "hadamard"_a, "sparse_rows"_a);
  m.def("buffer_info", &buffer_info, "buf"_a.noconvert(), "num_threads"_a);
  m.def("decode", &decode, "buf"_a.noconvert(), "num_threads"_a);
  m.def("decode_sparse", &decode_sparse, "buf"_a.noconvert(), "num_threads"_a);
  m.def("decode_accumulate", &decode_accumulate, "buffers"_a.noconvert(), "weights"_a.noconvert(),
        "out"_a.noconvert(), "num_threads"_a);
}
