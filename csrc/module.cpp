// pybind11 bindings of mup._native. The Python front end (mup.native) validates inputs and
// words the errors users see; the checks here keep direct calls memory-safe.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "kernels.hpp"

namespace py = pybind11;

namespace {

std::string shape_of(const py::array& a) {
  std::ostringstream s;
  s << "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s << (i ? ", " : "") << a.shape(i);
  s << (a.ndim() == 1 ? ",)" : ")");
  return s.str();
}

void expect_dtype(const py::array& a, const py::dtype& dt, const char* what,
                  const char* expected) {
  if (!a.dtype().is(dt) && !a.dtype().equal(dt))
    throw py::type_error(std::string(what) + " must be " + expected + ", got dtype " +
                         std::string(py::str(a.dtype())));
}

// acts [T, D] of `kind` (float32, or uint16 bits of float16 / bfloat16), unit stride in D.
mup::RaggedView acts_view(const py::array& acts, const std::string& kind_name,
                          const py::array_t<int64_t>& offsets) {
  mup::RaggedView v;
  v.kind = mup::parse_kind(kind_name);
  expect_dtype(acts, v.kind == mup::Kind::F32 ? py::dtype::of<float>() : py::dtype::of<uint16_t>(),
               "acts", v.kind == mup::Kind::F32 ? "float32 [T, D]" : "uint16 bits [T, D]");
  if (acts.ndim() != 2)
    throw py::value_error("acts must be 2-D [T, D], got shape " + shape_of(acts));
  v.T = acts.shape(0);
  v.D = acts.shape(1);
  if (v.D > 1 && acts.strides(1) != acts.itemsize())
    throw py::value_error("acts rows must be contiguous (unit stride along D)");
  v.data = static_cast<const char*>(acts.data());
  v.row_stride = acts.strides(0);
  if (offsets.ndim() != 1 || offsets.shape(0) < 1 || !(offsets.flags() & py::array::c_style))
    throw py::value_error("offsets must be contiguous int64 [N+1], got shape " +
                          shape_of(offsets));
  v.offsets = offsets.data();
  v.N = offsets.shape(0) - 1;
  if (v.offsets[0] != 0 || v.offsets[v.N] != v.T)
    throw py::value_error("offsets must be int64 [N+1] with offsets[0] == 0 and offsets[-1] == " +
                          std::string("acts.shape[0] == ") + std::to_string(v.T));
  for (int64_t i = 0; i < v.N; ++i)
    if (v.offsets[i + 1] < v.offsets[i])
      throw py::value_error("offsets must be non-decreasing; offsets[" + std::to_string(i) +
                            "] > offsets[" + std::to_string(i + 1) + "]");
  return v;
}

const uint8_t* mask_ptr(const std::optional<py::array_t<uint8_t>>& mask, int64_t T) {
  if (!mask) return nullptr;
  if (mask->ndim() != 1 || mask->shape(0) != T || !(mask->flags() & py::array::c_style))
    throw py::value_error("mask must be contiguous bool/uint8 [T] = [" + std::to_string(T) +
                          "], got shape " + shape_of(*mask));
  return mask->data();
}

const int64_t* rows_ptr(const py::array_t<int64_t>& rows, int64_t N) {
  if (rows.ndim() != 1 || !(rows.flags() & py::array::c_style))
    throw py::value_error("rows must be contiguous int64 [B], got shape " + shape_of(rows));
  const int64_t* r = rows.data();
  for (py::ssize_t i = 0; i < rows.shape(0); ++i)
    if (r[i] < 0 || r[i] >= N)
      throw py::value_error("rows[" + std::to_string(i) + "] == " + std::to_string(r[i]) +
                            " is outside [0, N) = [0, " + std::to_string(N) + ")");
  return r;
}

void check_fits(const int64_t* offsets, const int64_t* rows, int64_t B, int64_t P) {
  for (int64_t i = 0; i < B; ++i) {
    const int64_t len = offsets[rows[i] + 1] - offsets[rows[i]];
    if (len > P)
      throw py::value_error("row " + std::to_string(rows[i]) + " has " + std::to_string(len) +
                            " tokens > padded_len " + std::to_string(P));
  }
}

int threads_or_default(int num_threads) {
  if (num_threads > 0) return num_threads;
  return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
}

using Int64Array = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
using MaskArray = py::array_t<uint8_t, py::array::c_style>;

py::list pool(const py::array& acts, const std::string& kind, const Int64Array& offsets,
              const std::optional<MaskArray>& mask,
              const std::optional<py::array_t<float, py::array::c_style>>& scores,
              const std::vector<std::string>& methods, float temperature, int64_t window,
              int num_threads) {
  mup::RaggedView v = acts_view(acts, kind, offsets);
  v.mask = mask_ptr(mask, v.T);
  std::vector<mup::Method> ms;
  bool has_softmax = false;
  for (const auto& m : methods) {
    ms.push_back(mup::parse_method(m));
    has_softmax |= ms.back() == mup::Method::Softmax;
  }
  mup::PoolParams p;
  p.temperature = temperature;
  p.window = window;
  if (window < 1) throw py::value_error("window must be >= 1");
  if (has_softmax) {
    if (!scores || scores->ndim() != 1 || scores->shape(0) != v.T)
      throw py::value_error("softmax needs scores float32 [T] = [" + std::to_string(v.T) + "]");
    if (!(temperature > 0.0f)) throw py::value_error("temperature must be > 0");
    p.scores = scores->data();
  }
  // Every selected row needs a token: the kernels divide by the count / read the last one.
  for (int64_t i = 0; i < v.N; ++i) {
    int64_t c = 0;
    for (int64_t t = v.offsets[i]; t < v.offsets[i + 1] && c == 0; ++t)
      c += v.mask == nullptr ? 1 : (v.mask[t] != 0);
    if (c == 0)
      throw py::value_error("row " + std::to_string(i) + " has no (masked) tokens to pool");
  }
  std::vector<py::array_t<float>> outs;
  std::vector<float*> ptrs;
  for (size_t j = 0; j < ms.size(); ++j) {
    outs.emplace_back(std::vector<py::ssize_t>{v.N, v.D});
    ptrs.push_back(outs.back().mutable_data());
  }
  {
    py::gil_scoped_release release;
    mup::pool_many(v, ms, p, ptrs, threads_or_default(num_threads));
  }
  py::list result;
  for (auto& o : outs) result.append(o);
  return result;
}

py::tuple gather_padded(const py::array& acts, const std::string& kind,
                        const Int64Array& offsets, const Int64Array& rows, int64_t padded_len,
                        const std::optional<MaskArray>& mask, const std::string& out_kind_name,
                        int num_threads) {
  mup::RaggedView v = acts_view(acts, kind, offsets);
  v.mask = mask_ptr(mask, v.T);
  const mup::Kind out_kind = mup::parse_kind(out_kind_name);
  if (out_kind != v.kind && out_kind != mup::Kind::F32)
    throw py::type_error("gather_padded converts only to the same dtype or to float32");
  const int64_t* r = rows_ptr(rows, v.N);
  const int64_t B = rows.shape(0);
  if (padded_len < 0) throw py::value_error("padded_len must be >= 0");
  check_fits(v.offsets, r, B, padded_len);
  const std::vector<py::ssize_t> shape{B, padded_len, v.D};
  py::array block = out_kind == mup::Kind::F32 ? py::array(py::array_t<float>(shape))
                                               : py::array(py::array_t<uint16_t>(shape));
  py::array_t<uint8_t> block_mask(std::vector<py::ssize_t>{B, padded_len});
  char* bp = static_cast<char*>(block.mutable_data());
  uint8_t* mp = block_mask.mutable_data();
  {
    py::gil_scoped_release release;
    mup::gather_padded(v, r, B, padded_len, out_kind, bp, mp, threads_or_default(num_threads));
  }
  return py::make_tuple(block, block_mask);
}

void scatter_padded(const py::array& block, const std::string& block_kind_name,
                    const Int64Array& offsets, const Int64Array& rows, py::array& out,
                    const std::string& out_kind_name, int num_threads) {
  const mup::Kind bk = mup::parse_kind(block_kind_name), ok = mup::parse_kind(out_kind_name);
  if (ok != bk && ok != mup::Kind::F32)
    throw py::type_error("scatter_padded converts only to the same dtype or to float32");
  if (block.ndim() != 3 || !(block.flags() & py::array::c_style) ||
      block.itemsize() != mup::kind_size(bk))
    throw py::value_error("block must be C-contiguous [B, P, D] of " + block_kind_name +
                          ", got shape " + shape_of(block));
  if (out.ndim() != 2 || !(out.flags() & py::array::c_style) || !out.writeable() ||
      out.itemsize() != mup::kind_size(ok))
    throw py::value_error("out must be writable C-contiguous [T, D] of " + out_kind_name +
                          ", got shape " + shape_of(out));
  const int64_t B = block.shape(0), P = block.shape(1), D = block.shape(2), T = out.shape(0);
  if (out.shape(1) != D || rows.ndim() != 1 || rows.shape(0) != B)
    throw py::value_error("block [B, P, D], rows [B] and out [T, D] disagree: block " +
                          shape_of(block) + ", rows " + shape_of(rows) + ", out " +
                          shape_of(out));
  if (offsets.ndim() != 1 || offsets.shape(0) < 1 || offsets.data()[0] != 0 ||
      offsets.data()[offsets.shape(0) - 1] != T)
    throw py::value_error("offsets must be int64 [N+1] with offsets[-1] == out.shape[0] == " +
                          std::to_string(T));
  const int64_t N = offsets.shape(0) - 1;
  for (int64_t i = 0; i < N; ++i)
    if (offsets.data()[i + 1] < offsets.data()[i])
      throw py::value_error("offsets must be non-decreasing");
  const int64_t* r = rows_ptr(rows, N);
  check_fits(offsets.data(), r, B, P);
  const char* bp = static_cast<const char*>(block.data());
  char* op = static_cast<char*>(out.mutable_data());
  const int64_t* off = offsets.data();
  py::gil_scoped_release release;
  mup::scatter_padded(bp, bk, B, P, D, off, r, op, ok, threads_or_default(num_threads));
}

py::tuple plan_batches(const Int64Array& lengths, const Int64Array& order,
                       const Int64Array& buckets, int64_t token_budget, int64_t max_rows) {
  const int64_t N = lengths.shape(0), K = buckets.shape(0);
  if (lengths.ndim() != 1 || order.ndim() != 1 || order.shape(0) != N || buckets.ndim() != 1 ||
      K < 1)
    throw py::value_error("lengths [N], order [N] and buckets [K >= 1] must be 1-D");
  if (token_budget < 1 || max_rows < 1)
    throw py::value_error("token_budget and max_rows must be >= 1");
  for (int64_t i = 0; i < N; ++i)
    if (order.data()[i] < 0 || order.data()[i] >= N)
      throw py::value_error("order must be a permutation of [0, N)");
  std::vector<int64_t> rows, starts, padded;
  {
    py::gil_scoped_release release;
    mup::plan_batches(lengths.data(), order.data(), N, buckets.data(), K, token_budget, max_rows,
                      rows, starts, padded);
  }
  auto to_array = [](const std::vector<int64_t>& v) {
    py::array_t<int64_t> a(static_cast<py::ssize_t>(v.size()));
    std::copy(v.begin(), v.end(), a.mutable_data());
    return a;
  };
  return py::make_tuple(to_array(rows), to_array(starts), to_array(padded));
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() =
      "C++ kernels behind mup.native: masked pooling and padded batching over ragged "
      "activations (float32 accumulation, GIL released, threads across sequences).";
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const std::invalid_argument& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    }
  });
  m.def("pool", &pool, py::arg("acts"), py::arg("kind"), py::arg("offsets"), py::arg("mask"),
        py::arg("scores"), py::arg("methods"), py::arg("temperature"), py::arg("window"),
        py::arg("num_threads"),
        "Pool each sequence of acts [T, D] for every method: list of [N, D] float32.");
  m.def("gather_padded", &gather_padded, py::arg("acts"), py::arg("kind"), py::arg("offsets"),
        py::arg("rows"), py::arg("padded_len"), py::arg("mask"), py::arg("out_kind"),
        py::arg("num_threads"), "Padded block [B, P, D] and block mask uint8 [B, P].");
  m.def("scatter_padded", &scatter_padded, py::arg("block"), py::arg("block_kind"),
        py::arg("offsets"), py::arg("rows"), py::arg("out"), py::arg("out_kind"),
        py::arg("num_threads"), "Write the real tokens of block [B, P, D] into out [T, D].");
  m.def("plan_batches", &plan_batches, py::arg("lengths"), py::arg("order"), py::arg("buckets"),
        py::arg("token_budget"), py::arg("max_rows"),
        "Batches by bucket: (rows int64 [N], starts int64 [M+1], padded_len int64 [M]).");
  m.def(
      "default_num_threads", [] { return threads_or_default(0); },
      "Threads used when num_threads <= 0 (std::thread::hardware_concurrency).");
}
