// pybind11 bindings for safetensors I/O, streamed weighted sums, Gram matrices and the
// bf16/f16 conversions. Thin: validate, take pointers, release the GIL, translate errors.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "common.h"
#include "loramix/safetensors.h"
#include "loramix/wsum.h"

namespace loramix::bind {
namespace py = pybind11;

namespace {

struct TensorRef {
  std::shared_ptr<const Mapping> map;  // keeps the file mapped while this ref lives
  const void* data = nullptr;
  int dtype = -1;
  std::string dtype_name, name, path;
  std::vector<uint64_t> shape;
  uint64_t numel = 0, nbytes = 0;
  uint64_t file_offset = 0;  // of the data in the file (the kernels pread there when map->fd >= 0)
};

struct PyFile {
  std::shared_ptr<const SafetensorsFile> f;
  const SafetensorsFile& get() const {
    if (!f) throw py::value_error("SafetensorsFile is closed");
    return *f;
  }
  const TensorInfo& info(const std::string& name) const {
    const TensorInfo* t = get().find(name);
    if (!t) throw py::key_error("no tensor '" + name + "' in '" + get().path() + "'");
    return *t;
  }
};

struct PyWriter {
  std::shared_ptr<SafetensorsWriter> w;
};

// Keeps writers pinned open while a write runs without the GIL.
struct Pins {
  std::vector<SafetensorsWriter*> ws;
  void add(SafetensorsWriter* w) {
    w->pin();
    ws.push_back(w);
  }
  ~Pins() {
    for (auto* w : ws) w->unpin();
  }
};

DType parse_dtype(const std::string& s) {
  if (s == "F32" || s == "f32" || s == "float32") return DType::F32;
  if (s == "F16" || s == "f16" || s == "float16") return DType::F16;
  if (s == "BF16" || s == "bf16" || s == "bfloat16") return DType::BF16;
  throw py::value_error("unsupported dtype '" + s + "' (expected F32, F16 or BF16)");
}

py::dtype np_dtype(DType d) {
  switch (d) {
    case DType::F32: return py::dtype("float32");
    case DType::F16: return py::dtype("float16");
    default: return py::dtype("uint16");
  }
}

py::tuple shape_tuple(const std::vector<uint64_t>& s) {
  py::tuple t(s.size());
  for (std::size_t i = 0; i < s.size(); ++i) t[i] = py::int_(s[i]);
  return t;
}

std::vector<py::ssize_t> shape_vec(const std::vector<uint64_t>& s) {
  return std::vector<py::ssize_t>(s.begin(), s.end());
}

void clear_writeable(py::array& a) {
  py::detail::array_proxy(a.ptr())->flags &= ~py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
}

// A read-only numpy view of mapped memory that keeps the mapping alive.
py::array mapped_view(const std::shared_ptr<const Mapping>& map, const void* data, DType d,
                      const std::vector<uint64_t>& shape) {
  auto* keep = new std::shared_ptr<const Mapping>(map);
  py::capsule base(keep, [](void* p) { delete static_cast<std::shared_ptr<const Mapping>*>(p); });
  py::array a(np_dtype(d), shape_vec(shape), {}, data, base);
  clear_writeable(a);
  return a;
}

TensorRef make_ref(const PyFile& pf, const std::string& name) {
  const SafetensorsFile& f = pf.get();
  const TensorInfo& t = pf.info(name);
  TensorRef r;
  r.map = f.mapping();
  r.data = f.data(t);
  r.dtype = t.dtype;
  r.dtype_name = t.dtype_name;
  r.name = t.name;
  r.path = f.path();
  r.shape = t.shape;
  r.numel = t.numel;
  r.nbytes = t.end - t.begin;
  r.file_offset = static_cast<uint64_t>(static_cast<const char*>(r.data) - static_cast<const char*>(r.map->addr));
  return r;
}

[[noreturn]] void unsupported_dtype(const std::string& dtype, const std::string& name,
                                    const std::string& path) {
  throw py::value_error("tensor '" + name + "' in '" + path + "' has dtype " + dtype +
                        ", which loramix does not read (only F32, F16 and BF16)");
}

// Sources: TensorRefs or C-contiguous float32/float16 numpy arrays, all of one element count.
struct Sources {
  std::vector<SrcView> views;
  std::vector<py::object> keep;
  uint64_t n = 0;
};

Sources collect_sources(const py::handle& seq_obj) {
  if (!py::isinstance<py::sequence>(seq_obj) || py::isinstance<py::str>(seq_obj))
    throw py::type_error("sources: expected a list of TensorRef or numpy arrays");
  py::sequence seq = py::reinterpret_borrow<py::sequence>(seq_obj);
  Sources s;
  const std::size_t K = seq.size();
  if (K == 0) throw py::value_error("sources: empty list (need at least one source)");
  for (std::size_t k = 0; k < K; ++k) {
    py::object o = seq[k];
    uint64_t cnt;
    SrcView v;
    if (py::isinstance<TensorRef>(o)) {
      const TensorRef& r = o.cast<const TensorRef&>();
      if (r.dtype < 0) unsupported_dtype(r.dtype_name, r.name, r.path);
      v = {r.data, static_cast<DType>(r.dtype)};
      if (r.map && r.map->fd >= 0 && r.nbytes) {  // read with pread: its pages never enter the process
        v.fd = r.map->fd;
        v.offset = r.file_offset;
        v.path = &r.path;
      }
      cnt = r.numel;
    } else if (py::isinstance<py::array>(o)) {
      auto a = py::reinterpret_borrow<py::array>(o);
      const std::string what = "sources[" + std::to_string(k) + "]";
      if (a.dtype().is(py::dtype::of<float>())) {
        v = {require_array<float>(a, what.c_str()).data(), DType::F32};
      } else if (a.dtype().is(py::dtype("float16"))) {
        if (!(a.flags() & py::array::c_style))
          throw py::value_error(what + ": array is not C-contiguous (use numpy.ascontiguousarray first)");
        v = {a.data(), DType::F16};
      } else {
        throw py::type_error(what + ": expected dtype float32 or float16, got " +
                             std::string(py::str(a.dtype())) + " (convert with .astype() first)");
      }
      cnt = static_cast<uint64_t>(a.size());
    } else {
      throw py::type_error("sources[" + std::to_string(k) + "]: expected a TensorRef or a numpy array, got " +
                           std::string(py::str(py::type::handle_of(o).attr("__name__"))));
    }
    if (k == 0) s.n = cnt;
    else if (cnt != s.n)
      throw py::value_error("sources[" + std::to_string(k) + "] has " + std::to_string(cnt) +
                            " elements but sources[0] has " + std::to_string(s.n));
    s.views.push_back(v);
    s.keep.push_back(o);
  }
  return s;
}

// Weights as a Q x K float32 C-contiguous array (1-D means Q = 1).
py::array_t<float, py::array::c_style> weights_2d(const py::handle& obj, std::size_t K, std::size_t* Q) {
  auto w = require_array<float>(obj, "weights");
  if (w.ndim() == 1) {
    *Q = 1;
    if (static_cast<std::size_t>(w.shape(0)) != K)
      throw py::value_error("weights has " + std::to_string(w.shape(0)) + " entries for " +
                            std::to_string(K) + " sources");
  } else if (w.ndim() == 2) {
    *Q = static_cast<std::size_t>(w.shape(0));
    if (static_cast<std::size_t>(w.shape(1)) != K)
      throw py::value_error("weights has " + std::to_string(w.shape(1)) + " columns for " +
                            std::to_string(K) + " sources");
  } else {
    throw py::value_error("weights must be 1-D (K,) or 2-D (Q, K)");
  }
  return w;
}

int writer_entry(const SafetensorsWriter& w, const std::string& name) {
  const int idx = w.index(name);
  if (idx < 0) throw py::key_error("no tensor '" + name + "' among the entries of the writer for '" + w.path() + "'");
  return idx;
}

SafetensorsWriter& open_writer(PyWriter& pw) {
  if (!pw.w) throw py::value_error("SafetensorsWriter is closed");
  pw.w->check_open();
  return *pw.w;
}

void write_array(PyWriter& pw, const std::string& name, const py::array& arr) {
  SafetensorsWriter& w = open_writer(pw);
  const int idx = writer_entry(w, name);
  const WriterEntry& e = w.entries()[idx];
  const DType d = e.dtype;
  bool need_convert = false;
  const py::dtype want = np_dtype(d);
  if (arr.dtype().is(want)) {
  } else if (d != DType::F32 && arr.dtype().is(py::dtype::of<float>())) {
    need_convert = true;
  } else {
    throw py::type_error("tensor '" + name + "' is " + dtype_name(d) + ": expected a numpy array of dtype " +
                         std::string(py::str(want)) + (d == DType::F32 ? "" : " or float32") + ", got " +
                         std::string(py::str(arr.dtype())));
  }
  if (!(arr.flags() & py::array::c_style))
    throw py::value_error("tensor '" + name + "': array is not C-contiguous (use numpy.ascontiguousarray first)");
  bool same = static_cast<std::size_t>(arr.ndim()) == e.shape.size();
  for (std::size_t i = 0; same && i < e.shape.size(); ++i) same = static_cast<uint64_t>(arr.shape(i)) == e.shape[i];
  if (!same)
    throw py::value_error("tensor '" + name + "': array shape " + std::string(py::str(arr.attr("shape"))) +
                          " does not match the entry's shape " + std::string(py::str(shape_tuple(e.shape))));
  const void* data = arr.data();
  const DType from = need_convert ? DType::F32 : d;
  Pins pins;
  pins.add(&w);
  py::gil_scoped_release release;
  w.write_entry(idx, data, from);
}

// Where row q of a mix goes: entry names[q] of writer q, checked to hold n elements; a null
// writer discards its row (OutTarget::discard).
struct MixTargets {
  std::vector<OutTarget> out;
  std::vector<int> idx;
};

MixTargets mix_targets(const std::vector<SafetensorsWriter*>& ws, const std::vector<std::string>& names, uint64_t n) {
  MixTargets t;
  t.out.resize(ws.size());
  t.idx.assign(ws.size(), -1);
  for (std::size_t q = 0; q < ws.size(); ++q) {
    if (!ws[q]) {
      t.out[q].discard = true;
      continue;
    }
    const std::string& name = names[q];
    t.idx[q] = writer_entry(*ws[q], name);
    if (ws[q]->numel(t.idx[q]) != n)
      throw py::value_error("tensor '" + name + "' of the writer for '" + ws[q]->path() + "' has " +
                            std::to_string(ws[q]->numel(t.idx[q])) + " elements but the sources have " +
                            std::to_string(n));
    t.out[q].fd = ws[q]->fd();
    t.out[q].offset = ws[q]->offset(t.idx[q]);
    t.out[q].dtype = ws[q]->entries()[t.idx[q]].dtype;
    t.out[q].path = &ws[q]->temp_path();
  }
  return t;
}

// Weights of `sources` for `Q` writers: a Q x K float32 array (1-D means Q = 1).
py::array_t<float, py::array::c_style> mix_weights(const py::handle& weights, const Sources& s, std::size_t Q) {
  std::size_t rows = 0;
  auto w = weights_2d(weights, s.views.size(), &rows);
  if (rows != Q)
    throw py::value_error("weights has " + std::to_string(rows) + " rows for " + std::to_string(Q) + " writers");
  return w;
}

void mix_into_impl(const std::vector<SafetensorsWriter*>& ws, const std::string& name,
                   const py::handle& sources, const py::handle& weights, int threads) {
  Sources s = collect_sources(sources);
  const std::size_t Q = ws.size();
  auto w = mix_weights(weights, s, Q);
  MixTargets t = mix_targets(ws, std::vector<std::string>(Q, name), s.n);
  const float* W = w.data();
  const std::size_t K = s.views.size();
  Pins pins;
  for (auto* x : ws) pins.add(x);
  run_interruptible([&](Cancel& c) {
    weighted_sum(s.views.data(), K, W, Q, s.n, t.out.data(), threads, &c);
    return 0;
  });
  for (std::size_t q = 0; q < Q; ++q) ws[q]->mark_written(t.idx[q]);
}

// A pass of mix_into calls run as one (WsumPass): added one by one (from any Python thread),
// run once. Each call's sources stay referenced until the call is done; the writers are
// pinned open until run() returns.
struct PyPass {
  std::unique_ptr<WsumPass> pass;
  std::vector<Sources> sources;                           // per call, dropped once it is done
  std::vector<py::object> writers;                        // alive until run() returns
  std::vector<std::pair<SafetensorsWriter*, int>> marks;  // entries marked written after run()
  std::unique_ptr<Pins> pins = std::make_unique<Pins>();
  std::size_t dropped = 0;  // calls [0, dropped) have released their sources

  // Under the GIL: release the sources of the calls done so far.
  void drop_done(std::size_t done) {
    for (; dropped < done; ++dropped) sources[dropped] = Sources();
  }
};

std::vector<SafetensorsWriter*> writer_list(const py::sequence& writers) {
  std::vector<SafetensorsWriter*> ws;
  for (py::handle h : writers) ws.push_back(&open_writer(h.cast<PyWriter&>()));
  if (ws.empty()) throw py::value_error("mix_into: no writers");
  return ws;
}

template <class In, class Out>
py::array convert_array(const py::handle& obj, const char* what, py::dtype out_dt,
                        void (*fn)(const In*, Out*, std::size_t)) {
  auto a = require_array<In>(obj, what);
  py::array out(out_dt, std::vector<py::ssize_t>(a.shape(), a.shape() + a.ndim()));
  const In* in = a.data();
  Out* o = static_cast<Out*>(out.mutable_data());
  const std::size_t n = static_cast<std::size_t>(a.size());
  {
    py::gil_scoped_release release;
    fn(in, o, n);
  }
  return out;
}

}  // namespace

void register_tensors(py::module_& m) {
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const OsError& e) {
      py::object err = py::module_::import("builtins").attr("OSError")(e.err, e.what(), e.path);
      PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(err.ptr())), err.ptr());
    }
  });

  py::class_<TensorRef>(m, "TensorRef",
                        "A tensor inside a mapped safetensors file, for the streaming kernels. "
                        "Keeps the mapping alive.")
      .def_property_readonly("name", [](const TensorRef& r) { return r.name; })
      .def_property_readonly("path", [](const TensorRef& r) { return r.path; })
      .def_property_readonly("dtype", [](const TensorRef& r) { return r.dtype_name; })
      .def_property_readonly("shape", [](const TensorRef& r) { return shape_tuple(r.shape); })
      .def_property_readonly("size", [](const TensorRef& r) { return r.numel; })
      .def_property_readonly("nbytes", [](const TensorRef& r) { return r.nbytes; })
      .def_property_readonly("pread", [](const TensorRef& r) { return r.map && r.map->fd >= 0; },
                             "True when the streaming kernels read it with pread (its pages never enter "
                             "this process); False when they read it through the mapping.")
      .def("numpy", [](const TensorRef& r) {
        if (r.dtype < 0) unsupported_dtype(r.dtype_name, r.name, r.path);
        return mapped_view(r.map, r.data, static_cast<DType>(r.dtype), r.shape);
      }, "Zero-copy read-only view (BF16 as uint16 bits).")
      .def("__repr__", [](const TensorRef& r) {
        return "TensorRef('" + r.name + "', " + r.dtype_name + ", " + std::string(py::str(shape_tuple(r.shape))) +
               ", '" + r.path + "')";
      });

  py::class_<PyFile>(m, "SafetensorsFile", "A memory-mapped, validated safetensors file.")
      .def(py::init([](const std::string& path) {
             PyFile pf;
             py::gil_scoped_release release;
             pf.f = std::make_shared<const SafetensorsFile>(path);
             return pf;
           }),
           py::arg("path"))
      .def_property_readonly("path", [](const PyFile& p) { return p.get().path(); })
      .def("keys", [](const PyFile& p) {
        py::list l;
        for (const auto& t : p.get().tensors()) l.append(py::str(t.name));
        return l;
      }, "Tensor names in the order of their data in the file.")
      .def_property_readonly("metadata", [](const PyFile& p) {
        py::dict d;
        for (const auto& kv : p.get().metadata()) d[py::str(kv.first)] = py::str(kv.second);
        return d;
      })
      .def_property_readonly("has_metadata", [](const PyFile& p) { return p.get().has_metadata(); },
                             "Whether the header holds a __metadata__ object (rewrite with metadata=None if not).")
      .def("dtype", [](const PyFile& p, const std::string& n) { return p.info(n).dtype_name; })
      .def("shape", [](const PyFile& p, const std::string& n) { return shape_tuple(p.info(n).shape); })
      .def("nbytes", [](const PyFile& p, const std::string& n) {
        const auto& t = p.info(n);
        return t.end - t.begin;
      })
      .def("__contains__", [](const PyFile& p, const std::string& n) { return p.get().find(n) != nullptr; })
      .def("__len__", [](const PyFile& p) { return p.get().tensors().size(); })
      .def("numpy", [](const PyFile& p, const std::string& n) {
        const TensorInfo& t = p.info(n);
        if (t.dtype < 0) unsupported_dtype(t.dtype_name, t.name, p.get().path());
        return mapped_view(p.get().mapping(), p.get().data(t), static_cast<DType>(t.dtype), t.shape);
      }, py::arg("name"))
      .def("to_f32", [](const PyFile& p, const std::string& n) {
        const TensorInfo& t = p.info(n);
        if (t.dtype < 0) unsupported_dtype(t.dtype_name, t.name, p.get().path());
        py::array_t<float> out(shape_vec(t.shape));
        const void* src = p.get().data(t);
        float* o = out.mutable_data();
        {
          py::gil_scoped_release release;
          convert_to_f32(src, static_cast<DType>(t.dtype), o, t.numel);
        }
        return out;
      }, py::arg("name"))
      .def("tensor", [](const PyFile& p, const std::string& n) { return make_ref(p, n); }, py::arg("name"))
      .def("close", [](PyFile& p) { p.f.reset(); },
           "Drops this object's reference to the mapping (views and TensorRefs keep theirs).")
      .def_property_readonly("closed", [](const PyFile& p) { return !p.f; })
      .def("__repr__", [](const PyFile& p) {
        if (!p.f) return std::string("SafetensorsFile(<closed>)");
        return "SafetensorsFile('" + p.f->path() + "', " + std::to_string(p.f->tensors().size()) + " tensors)";
      });

  py::class_<PyWriter>(m, "SafetensorsWriter", "Streamed, atomic safetensors writer.")
      .def(py::init([](const std::string& path, const py::sequence& entries, const py::object& metadata) {
             std::vector<WriterEntry> es;
             for (py::handle h : entries) {
               py::tuple t = py::reinterpret_borrow<py::object>(h).cast<py::tuple>();
               if (t.size() != 3) throw py::value_error("entries: expected (name, dtype, shape) tuples");
               WriterEntry e;
               e.name = t[0].cast<std::string>();
               e.dtype = parse_dtype(t[1].cast<std::string>());
               for (py::handle d : t[2].cast<py::sequence>()) {
                 const long long v = d.cast<long long>();
                 if (v < 0) throw py::value_error("entries: tensor '" + e.name + "' has a negative dimension");
                 e.shape.push_back(static_cast<uint64_t>(v));
               }
               es.push_back(std::move(e));
             }
             Metadata md;
             const bool has_md = !metadata.is_none();
             if (has_md) {
               if (!py::isinstance<py::dict>(metadata)) throw py::type_error("metadata must be a dict[str, str] or None");
               for (auto kv : metadata.cast<py::dict>()) {
                 if (!py::isinstance<py::str>(kv.first) || !py::isinstance<py::str>(kv.second))
                   throw py::type_error("metadata must map str to str");
                 md.emplace_back(kv.first.cast<std::string>(), kv.second.cast<std::string>());
               }
             }
             PyWriter pw;
             pw.w = std::make_shared<SafetensorsWriter>(path, std::move(es), has_md ? &md : nullptr);
             return pw;
           }),
           py::arg("path"), py::arg("entries"), py::arg("metadata") = py::none())
      .def_property_readonly("path", [](const PyWriter& p) { return p.w->path(); })
      .def_property_readonly("temp_path", [](const PyWriter& p) { return p.w->temp_path(); })
      .def_property_readonly("closed", [](const PyWriter& p) { return !p.w->open(); })
      .def("write", &write_array, py::arg("name"), py::arg("array"))
      .def("write_weighted_sum", [](PyWriter& p, const std::string& name, const py::object& sources,
                                    const py::object& weights, int threads) {
        std::vector<SafetensorsWriter*> ws{&open_writer(p)};
        auto w = require_array<float>(weights, "weights");
        if (w.ndim() != 1) throw py::value_error("write_weighted_sum: weights must be 1-D (K,)");
        mix_into_impl(ws, name, sources, weights, threads);
      }, py::arg("name"), py::arg("sources"), py::arg("weights"), py::arg("threads") = 0)
      .def("commit", [](PyWriter& p) {
        if (!p.w) throw py::value_error("SafetensorsWriter is closed");
        py::gil_scoped_release release;
        p.w->commit();
      })
      .def("abort", [](PyWriter& p) { p.w->abort_checked(); },
           "Closes and removes the temporary file (no-op once committed or aborted).");

  // One call for a module's tensors across a bank's members: the Python loop over members
  // (a file.tensor() call each) was a measurable part of a mix at N = 502.
  m.def("tensor_refs", [](const py::sequence& files, const py::sequence& names) {
    const std::size_t n = files.size();
    if (names.size() != n)
      throw py::value_error("tensor_refs: " + std::to_string(n) + " files but " + std::to_string(names.size()) + " names");
    py::list out(n);
    for (std::size_t i = 0; i < n; ++i) {
      py::handle f = files[i];
      if (!py::isinstance<PyFile>(f))
        throw py::type_error("tensor_refs: files[" + std::to_string(i) + "] is not a SafetensorsFile");
      out[i] = py::cast(make_ref(f.cast<const PyFile&>(), names[i].cast<std::string>()));
    }
    return out;
  }, py::arg("files"), py::arg("names"),
     "[files[i].tensor(names[i]) for i in ...], in one call.");

  m.def("mix_into", [](const py::sequence& writers, const std::string& name, const py::object& sources,
                       const py::object& weights, int threads) {
    mix_into_impl(writer_list(writers), name, sources, weights, threads);
  }, py::arg("writers"), py::arg("name"), py::arg("sources"), py::arg("weights"), py::arg("threads") = 0);

  py::class_<PyPass>(m, "MixPass",
                     "mix_into calls run as one pass on one set of threads (see wsum.h, WsumPass).")
      .def(py::init([](int threads) {
             PyPass p;
             p.pass = std::make_unique<WsumPass>(threads);
             return p;
           }), py::arg("threads") = 0)
      .def("add", [](PyPass& p, const py::sequence& writers, const py::object& names, const py::object& sources,
                     const py::object& weights) {
        const std::size_t Q = writers.size();
        if (Q == 0) throw py::value_error("mix_into: no writers");
        std::vector<SafetensorsWriter*> ws(Q, nullptr);
        for (std::size_t q = 0; q < Q; ++q)
          if (!writers[q].is_none()) ws[q] = &open_writer(writers[q].cast<PyWriter&>());
        if (std::all_of(ws.begin(), ws.end(), [](SafetensorsWriter* x) { return x == nullptr; }))
          throw py::value_error("MixPass.add: every writer is None (nothing would be written)");
        std::vector<std::string> nm(Q);
        if (py::isinstance<py::str>(names)) {
          std::fill(nm.begin(), nm.end(), names.cast<std::string>());
        } else {
          const auto ns = names.cast<py::sequence>();
          if (ns.size() != Q)
            throw py::value_error("names: " + std::to_string(ns.size()) + " names for " + std::to_string(Q) + " writers");
          for (std::size_t q = 0; q < Q; ++q) nm[q] = ns[q].cast<std::string>();
        }
        Sources s = collect_sources(sources);
        auto w = mix_weights(weights, s, Q);
        MixTargets t = mix_targets(ws, nm, s.n);
        if (!p.pins) p.pins = std::make_unique<Pins>();  // run() has returned: the add below throws
        Pins pinned;  // pinned before the pass can start the call; handed to the pass once it is in
        for (auto* x : ws)
          if (x) pinned.add(x);
        p.pins->ws.reserve(p.pins->ws.size() + pinned.ws.size());  // the hand-over below cannot throw
        const std::size_t i = p.pass->add(s.views.data(), s.views.size(), w.data(), Q, s.n, t.out.data());
        p.pins->ws.insert(p.pins->ws.end(), pinned.ws.begin(), pinned.ws.end());
        pinned.ws.clear();
        for (std::size_t q = 0; q < Q; ++q) {
          if (!ws[q]) continue;
          p.marks.emplace_back(ws[q], t.idx[q]);
          p.writers.push_back(py::reinterpret_borrow<py::object>(writers[q]));
        }
        p.sources.push_back(std::move(s));
        return i;
      }, py::arg("writers"), py::arg("names"), py::arg("sources"), py::arg("weights"),
         "Adds the call mix_into(writers, name, sources, weights); `names`: one name for every "
         "writer, or one per writer; a writer None discards its row. Returns the call's index.")
      .def("close", [](PyPass& p) { p.pass->close(); }, "No more calls: run() returns once all are done.")
      .def("done", [](const PyPass& p) { return p.pass->done(); },
           "Calls finished in order: calls [0, done()) are written.")
      .def("__len__", [](const PyPass& p) { return p.pass->size(); })
      .def_property_readonly("threads", [](const PyPass& p) { return p.pass->threads(); })
      .def("run", [](PyPass& p, const py::object& progress) {
        std::size_t seen = 0;
        auto tick = [&] {
          const std::size_t d = p.pass->done();
          p.drop_done(d);
          if (d > seen && !progress.is_none()) progress(d);
          seen = std::max(seen, d);
        };
        try {
          run_interruptible([&](Cancel& c) {
            p.pass->run(&c);
            return 0;
          }, tick, std::chrono::milliseconds(5));
        } catch (...) {
          p.pins.reset();
          throw;
        }
        p.pins.reset();
        for (auto& [w, idx] : p.marks) w->mark_written(idx);
        p.drop_done(p.pass->done());
        p.writers.clear();
      }, py::arg("progress") = py::none(),
         "Runs the calls until close() and all are done. progress(done) is called from this thread "
         "(with the GIL) as calls finish, every 5 ms at most; not after the last call.");

  m.def("weighted_sum", [](const py::object& sources, const py::object& weights, const std::string& out_dtype,
                           int threads) {
    Sources s = collect_sources(sources);
    std::size_t Q = 0;
    auto w = weights_2d(weights, s.views.size(), &Q);
    const DType od = parse_dtype(out_dtype);
    py::array out(np_dtype(od), std::vector<py::ssize_t>{static_cast<py::ssize_t>(Q), static_cast<py::ssize_t>(s.n)});
    std::vector<OutTarget> targets(Q);
    char* base = static_cast<char*>(out.mutable_data());
    for (std::size_t q = 0; q < Q; ++q) {
      targets[q].mem = base + q * s.n * dtype_size(od);
      targets[q].dtype = od;
    }
    const float* W = w.data();
    const std::size_t K = s.views.size();
    run_interruptible([&](Cancel& c) {
      weighted_sum(s.views.data(), K, W, Q, s.n, targets.data(), threads, &c);
      return 0;
    });
    return out;
  }, py::arg("sources"), py::arg("weights"), py::arg("out_dtype") = "F32", py::arg("threads") = 0,
     "(Q, n) array: out[q] = sum_k weights[q, k] * sources[k]; weights float32 (Q, K) or (K,).");

  m.def("gram", [](const py::object& sources, int threads) {
    Sources s = collect_sources(sources);
    const std::size_t K = s.views.size();
    py::array_t<double> G({static_cast<py::ssize_t>(K), static_cast<py::ssize_t>(K)});
    double* g = G.mutable_data();
    run_interruptible([&](Cancel& c) {
      gram(s.views.data(), K, s.n, g, threads, &c);
      return 0;
    });
    return G;
  }, py::arg("sources"), py::arg("threads") = 0);

  m.def("f32_to_bf16", [](const py::object& a) {
    return convert_array<float, uint16_t>(a, "f32_to_bf16", py::dtype("uint16"),
        [](const float* i, uint16_t* o, std::size_t n) { convert_from_f32(i, o, DType::BF16, n); });
  });
  m.def("f32_to_f16", [](const py::object& a) {
    return convert_array<float, uint16_t>(a, "f32_to_f16", py::dtype("float16"),
        [](const float* i, uint16_t* o, std::size_t n) { convert_from_f32(i, o, DType::F16, n); });
  });
  m.def("bf16_to_f32", [](const py::object& a) {
    return convert_array<uint16_t, float>(a, "bf16_to_f32", py::dtype("float32"),
        [](const uint16_t* i, float* o, std::size_t n) { convert_to_f32(i, DType::BF16, o, n); });
  });
  m.def("f16_to_f32", [](const py::object& obj) {
    if (!py::isinstance<py::array>(obj) || !py::reinterpret_borrow<py::array>(obj).dtype().is(py::dtype("float16")))
      throw py::type_error("f16_to_f32: expected a numpy float16 array");
    auto a = py::reinterpret_borrow<py::array>(obj);
    if (!(a.flags() & py::array::c_style)) throw py::value_error("f16_to_f32: array is not C-contiguous");
    py::array out(py::dtype("float32"), std::vector<py::ssize_t>(a.shape(), a.shape() + a.ndim()));
    const void* in = a.data();
    float* o = static_cast<float*>(out.mutable_data());
    const std::size_t n = static_cast<std::size_t>(a.size());
    {
      py::gil_scoped_release release;
      convert_to_f32(in, DType::F16, o, n);
    }
    return out;
  });
  // Bounded memory when streaming a bank: once a tensor has been read, its pages leave this
  // process's page tables (they stay in the page cache; a later read maps them again). The
  // range is rounded outward to 64 KiB, the kernel's fault-around window (a read fault maps up
  // to 16 cached pages around the address, so pages of neighbouring tensors get mapped too); a
  // neighbour dropped that way is mapped again if read later, which only costs a fault (the
  // mapping is read-only and private).
  m.def("release_pages", [](const py::sequence& refs) {
    std::vector<std::pair<char*, std::size_t>> spans;
    const std::size_t page = std::max<std::size_t>(static_cast<std::size_t>(sysconf(_SC_PAGESIZE)), 65536);
    for (py::handle h : refs) {
      if (!py::isinstance<TensorRef>(h))
        throw py::type_error("release_pages: expected TensorRef objects, got " +
                             std::string(py::str(py::type::handle_of(h).attr("__name__"))));
      const TensorRef& r = h.cast<const TensorRef&>();
      if (!r.map || r.nbytes == 0) continue;
      char* base = static_cast<char*>(r.map->addr);
      const std::size_t b = static_cast<std::size_t>(static_cast<const char*>(r.data) - base);
      const std::size_t lo = b / page * page;
      const std::size_t hi = std::min(r.map->len, (b + r.nbytes + page - 1) / page * page);
      if (hi > lo) spans.emplace_back(base + lo, hi - lo);
    }
    py::gil_scoped_release release;
    for (const auto& sp : spans) madvise(sp.first, sp.second, MADV_DONTNEED);  // advisory: errors ignored
  }, py::arg("refs"),
     "Drops the pages of these tensors from this process's mapping (MADV_DONTNEED); the data stay "
     "in the page cache and are mapped again when read.");
}

}  // namespace loramix::bind
