// Fuzz harness for the safetensors reader (parse_safetensors) and, for every image it accepts,
// the writer's header (serialize_header): what loramix writes it must read back unchanged.
//
// Built two ways (see tools/fuzz_safetensors.sh and docs/DEVELOPING.md):
//  - libFuzzer (clang, -fsanitize=fuzzer,address,undefined): coverage-guided, seeded with the
//    hostile files of tests/data/hostile;
//  - standalone (any compiler, -DLORAMIX_FUZZ_STANDALONE): replays the files named on the command
//    line, for a sanitizer run without clang.
// A crash, a sanitizer report, an exception other than FormatError, or a broken invariant
// (abort) is a finding; FormatError is the reader refusing a bad file, as it should.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "loramix/safetensors.h"

namespace {

using namespace loramix;

void check(bool ok, const char* what) {
  if (!ok) {
    std::fprintf(stderr, "fuzz_safetensors: invariant broken: %s\n", what);
    std::abort();
  }
}

// An accepted image describes contiguous tensors that tile the data section exactly.
void check_accepted(std::size_t len, const std::vector<TensorInfo>& ts, std::size_t start) {
  check(start >= 8 && start <= len, "data start inside the image");
  uint64_t pos = 0;
  for (const auto& t : ts) {
    check(t.begin == pos && t.end >= t.begin, "offsets contiguous from 0");
    pos = t.end;
  }
  check(pos == len - start, "data section exactly covered");
}

// Rewrites the accepted tensors of F32/F16/BF16 through serialize_header and parses the result:
// names, dtypes, shapes and metadata must come back as they were.
void round_trip(const std::vector<TensorInfo>& ts, const Metadata& md, bool has_md) {
  std::vector<WriterEntry> es;
  uint64_t bytes = 0;
  for (const auto& t : ts) {
    if (t.dtype < 0) continue;
    es.push_back({t.name, static_cast<DType>(t.dtype), t.shape});
    bytes += t.end - t.begin;
  }
  if (bytes > (uint64_t(1) << 24)) return;  // keep the image small
  std::string img;
  try {
    img = serialize_header(es, has_md ? &md : nullptr);
  } catch (const std::invalid_argument&) {
    return;  // e.g. a "__metadata__" tensor name is refused by the writer, as it should be
  }
  img.append(static_cast<std::size_t>(bytes), '\0');
  std::vector<TensorInfo> back;
  Metadata md2;
  bool has2 = false;
  std::size_t start = 0;
  parse_safetensors(reinterpret_cast<const uint8_t*>(img.data()), img.size(), "round-trip", &back,
                    &md2, &has2, &start);  // FormatError here escapes: a finding
  check(back.size() == es.size(), "round trip keeps every tensor");
  for (std::size_t i = 0; i < es.size(); ++i) {
    check(back[i].name == es[i].name, "round trip keeps names (in data order)");
    check(back[i].dtype == static_cast<int>(es[i].dtype), "round trip keeps dtypes");
    check(back[i].shape == es[i].shape, "round trip keeps shapes");
  }
  check(has2 == has_md && md2 == (has_md ? md : Metadata{}), "round trip keeps metadata");
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, std::size_t size) {
  std::vector<TensorInfo> ts;
  Metadata md;
  bool has_md = false;
  std::size_t start = 0;
  try {
    parse_safetensors(data, size, "fuzz", &ts, &md, &has_md, &start);
  } catch (const FormatError&) {
    return 0;
  }
  check_accepted(size, ts, start);
  round_trip(ts, md, has_md);
  return 0;
}

#if defined(LORAMIX_FUZZ_STANDALONE)
#include <fstream>
#include <iterator>

int main(int argc, char** argv) {
  int n = 0;
  for (int i = 1; i < argc; ++i) {
    std::ifstream f(argv[i], std::ios::binary);
    if (!f) {  // e.g. removed by a libFuzzer run reducing the same corpus
      std::fprintf(stderr, "fuzz_safetensors: skipped %s (cannot read it)\n", argv[i]);
      continue;
    }
    const std::string s((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    LLVMFuzzerTestOneInput(reinterpret_cast<const uint8_t*>(s.data()), s.size());
    ++n;
  }
  std::printf("fuzz_safetensors: %d inputs replayed, no finding\n", n);
  return 0;
}
#endif
