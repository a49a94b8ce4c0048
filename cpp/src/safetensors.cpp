#include "loramix/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <unordered_set>

#include "loramix/wsum.h"  // convert_from_f32

namespace loramix {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "safetensors data are little-endian");

constexpr uint64_t kMaxHeader = 100000000ull;  // the reference's MAX_HEADER_SIZE

namespace {
// Descriptors kept open by mappings, and the budget: half the soft RLIMIT_NOFILE (a bank of
// many members must not starve the rest of the process of descriptors).
std::atomic<long> g_kept_fds{0};

long fd_budget() {
  static const long budget = [] {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0 || rl.rlim_cur == RLIM_INFINITY) return 4096L;
    return static_cast<long>(rl.rlim_cur / 2);
  }();
  return budget;
}

// Takes one slot of the budget; false when it is spent.
bool keep_fd() {
  if (g_kept_fds.fetch_add(1) < fd_budget()) return true;
  g_kept_fds.fetch_sub(1);
  return false;
}
}  // namespace

Mapping::~Mapping() {
  if (addr && len) munmap(addr, len);
  if (fd >= 0) {
    ::close(fd);
    g_kept_fds.fetch_sub(1);
  }
}

namespace {

[[noreturn]] void fail(const std::string& path, const std::string& what) {
  throw FormatError("invalid safetensors file '" + path + "': " + what);
}

struct DtypeBits {
  const char* name;
  unsigned bits;
};
// Every dtype name the reference reader accepts, with its size in bits.
constexpr DtypeBits kDtypes[] = {
    {"BOOL", 8},     {"F4", 4},          {"F6_E2M3", 6},      {"F6_E3M2", 6}, {"U8", 8},
    {"I8", 8},       {"F8_E5M2", 8},     {"F8_E4M3", 8},      {"F8_E8M0", 8}, {"I16", 16},
    {"U16", 16},     {"F16", 16},        {"BF16", 16},        {"I32", 32},    {"U32", 32},
    {"F32", 32},     {"F64", 64},        {"I64", 64},         {"U64", 64},    {"C64", 64},
};

std::string quote(const std::string& s) {
  std::string out = "'";
  for (unsigned char c : s) {
    if (c < 0x20 || c == 0x7f) {
      char b[8];
      std::snprintf(b, sizeof b, "\\x%02x", c);
      out += b;
    } else {
      out += static_cast<char>(c);
    }
    if (out.size() > 200) {
      out += "...";
      break;
    }
  }
  return out + "'";
}

// Returns the offset of the first invalid byte, or len if `s` is valid UTF-8 (no overlongs,
// no surrogates, nothing above U+10FFFF).
std::size_t utf8_invalid_at(const uint8_t* s, std::size_t len) {
  std::size_t i = 0;
  while (i < len) {
    const uint8_t c = s[i];
    if (c < 0x80) {
      ++i;
      continue;
    }
    std::size_t n;
    uint32_t cp;
    if ((c & 0xe0) == 0xc0) {
      n = 2, cp = c & 0x1f;
    } else if ((c & 0xf0) == 0xe0) {
      n = 3, cp = c & 0x0f;
    } else if ((c & 0xf8) == 0xf0) {
      n = 4, cp = c & 0x07;
    } else {
      return i;
    }
    if (i + n > len) return i;
    for (std::size_t k = 1; k < n; ++k) {
      if ((s[i + k] & 0xc0) != 0x80) return i;
      cp = (cp << 6) | (s[i + k] & 0x3f);
    }
    if ((n == 2 && cp < 0x80) || (n == 3 && cp < 0x800) || (n == 4 && cp < 0x10000) ||
        cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
      return i;
    i += n;
  }
  return len;
}

// A strict parser for exactly the safetensors header schema. No recursion: the schema is
// three levels deep and anything else is rejected at its first byte.
class HeaderParser {
 public:
  HeaderParser(const char* p, std::size_t n, const std::string& path)
      : b_(p), p_(p), e_(p + n), path_(path) {}

  void parse(std::vector<TensorInfo>* tensors, Metadata* md, bool* has_md) {
    if (p_ >= e_ || *p_ != '{') fail(path_, "header is not a JSON object (it must start with '{')");
    ++p_;
    std::unordered_set<std::string> seen;
    ws();
    if (peek() == '}') {
      ++p_;
    } else {
      for (;;) {
        ws();
        std::string key = string_();
        if (!seen.insert(key).second) err("duplicate key " + quote(key) + " in header");
        ws();
        expect(':');
        ws();
        if (key == "__metadata__") {
          *has_md = parse_metadata(md);
        } else {
          TensorInfo t;
          t.name = key;
          t.json_index = tensors->size();
          parse_tensor(&t);
          tensors->push_back(std::move(t));
        }
        ws();
        if (peek() == ',') {
          ++p_;
          continue;
        }
        if (peek() == '}') {
          ++p_;
          break;
        }
        err("expected ',' or '}' in the header object");
      }
    }
    ws();
    if (p_ != e_) err("unexpected data after the header's JSON object");
  }

 private:
  [[noreturn]] void err(const std::string& what) {
    fail(path_, "malformed header JSON at byte " + std::to_string(p_ - b_) + ": " + what);
  }
  char peek() {
    if (p_ >= e_) err("unexpected end of header");
    return *p_;
  }
  void ws() {
    while (p_ < e_ && (*p_ == ' ' || *p_ == '\t' || *p_ == '\n' || *p_ == '\r')) ++p_;
  }
  void expect(char c) {
    if (peek() != c) err(std::string("expected '") + c + "'");
    ++p_;
  }
  bool literal(const char* lit) {
    const std::size_t n = std::strlen(lit);
    if (static_cast<std::size_t>(e_ - p_) >= n && std::memcmp(p_, lit, n) == 0) {
      p_ += n;
      return true;
    }
    return false;
  }
  unsigned hex4() {
    if (e_ - p_ < 4) err("truncated \\u escape");
    unsigned v = 0;
    for (int i = 0; i < 4; ++i) {
      const char c = *p_++;
      v <<= 4;
      if (c >= '0' && c <= '9') v |= c - '0';
      else if (c >= 'a' && c <= 'f') v |= c - 'a' + 10;
      else if (c >= 'A' && c <= 'F') v |= c - 'A' + 10;
      else err("bad \\u escape");
    }
    return v;
  }
  static void put_utf8(std::string& s, uint32_t cp) {
    if (cp < 0x80) {
      s += static_cast<char>(cp);
    } else if (cp < 0x800) {
      s += static_cast<char>(0xc0 | (cp >> 6));
      s += static_cast<char>(0x80 | (cp & 0x3f));
    } else if (cp < 0x10000) {
      s += static_cast<char>(0xe0 | (cp >> 12));
      s += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
      s += static_cast<char>(0x80 | (cp & 0x3f));
    } else {
      s += static_cast<char>(0xf0 | (cp >> 18));
      s += static_cast<char>(0x80 | ((cp >> 12) & 0x3f));
      s += static_cast<char>(0x80 | ((cp >> 6) & 0x3f));
      s += static_cast<char>(0x80 | (cp & 0x3f));
    }
  }
  std::string string_() {
    if (peek() != '"') err("expected a string");
    ++p_;
    std::string s;
    for (;;) {
      if (p_ >= e_) err("unterminated string");
      const unsigned char c = static_cast<unsigned char>(*p_++);
      if (c == '"') return s;
      if (c < 0x20) err("raw control character in a string");
      if (c != '\\') {
        s += static_cast<char>(c);
        continue;
      }
      if (p_ >= e_) err("unterminated escape");
      const char x = *p_++;
      switch (x) {
        case '"': s += '"'; break;
        case '\\': s += '\\'; break;
        case '/': s += '/'; break;
        case 'b': s += '\b'; break;
        case 'f': s += '\f'; break;
        case 'n': s += '\n'; break;
        case 'r': s += '\r'; break;
        case 't': s += '\t'; break;
        case 'u': {
          uint32_t cp = hex4();
          if (cp >= 0xdc00 && cp <= 0xdfff) err("lone low surrogate in \\u escape");
          if (cp >= 0xd800 && cp <= 0xdbff) {
            if (!(literal("\\u"))) err("lone high surrogate in \\u escape");
            const uint32_t lo = hex4();
            if (lo < 0xdc00 || lo > 0xdfff) err("invalid surrogate pair in \\u escape");
            cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
          }
          put_utf8(s, cp);
          break;
        }
        default: err(std::string("invalid escape '\\") + x + "'");
      }
    }
  }
  // A JSON number that must be a non-negative integer fitting in u64.
  uint64_t uint_(const std::string& what) {
    const char* start = p_;
    if (p_ < e_ && *p_ == '-') ++p_;
    const char* digits = p_;
    while (p_ < e_ && *p_ >= '0' && *p_ <= '9') ++p_;
    if (p_ == digits) {
      p_ = start;
      err(what + " must be a non-negative integer");
    }
    const bool frac = p_ < e_ && (*p_ == '.' || *p_ == 'e' || *p_ == 'E');
    if (*start == '-' || frac) {
      p_ = start;
      err(what + " must be a non-negative integer, got " +
          quote(std::string(start, std::min<std::size_t>(e_ - start, 24))));
    }
    if (p_ - digits > 1 && *digits == '0') {
      p_ = start;
      err(what + ": leading zeros are not valid JSON");
    }
    uint64_t v = 0;
    for (const char* q = digits; q < p_; ++q) {
      if (__builtin_mul_overflow(v, 10u, &v) || __builtin_add_overflow(v, uint64_t(*q - '0'), &v)) {
        p_ = start;
        err(what + " does not fit in 64 bits");
      }
    }
    return v;
  }
  std::vector<uint64_t> uint_array(const std::string& what) {
    if (peek() != '[') err(what + " must be an array of non-negative integers");
    ++p_;
    std::vector<uint64_t> v;
    ws();
    if (peek() == ']') {
      ++p_;
      return v;
    }
    for (;;) {
      ws();
      v.push_back(uint_(what + " entry"));
      ws();
      if (peek() == ',') {
        ++p_;
        continue;
      }
      if (peek() == ']') {
        ++p_;
        return v;
      }
      err("expected ',' or ']' in " + what);
    }
  }
  bool parse_metadata(Metadata* md) {
    if (literal("null")) return false;
    if (peek() != '{') err("__metadata__ must be an object of string -> string");
    ++p_;
    std::unordered_set<std::string> seen;
    ws();
    if (peek() == '}') {
      ++p_;
      return true;
    }
    for (;;) {
      ws();
      std::string k = string_();
      if (!seen.insert(k).second) err("duplicate key " + quote(k) + " in __metadata__");
      ws();
      expect(':');
      ws();
      if (peek() != '"') err("__metadata__ value for " + quote(k) + " is not a string");
      md->emplace_back(std::move(k), string_());
      ws();
      if (peek() == ',') {
        ++p_;
        continue;
      }
      if (peek() == '}') {
        ++p_;
        return true;
      }
      err("expected ',' or '}' in __metadata__");
    }
  }
  void parse_tensor(TensorInfo* t) {
    const std::string who = "tensor " + quote(t->name);
    if (peek() != '{') err(who + " must be an object {dtype, shape, data_offsets}");
    ++p_;
    bool have_dtype = false, have_shape = false, have_off = false;
    ws();
    if (peek() != '}') {
      for (;;) {
        ws();
        const std::string k = string_();
        ws();
        expect(':');
        ws();
        if (k == "dtype") {
          if (have_dtype) err("duplicate key 'dtype' in " + who);
          have_dtype = true;
          if (peek() != '"') err(who + ": dtype must be a string");
          t->dtype_name = string_();
        } else if (k == "shape") {
          if (have_shape) err("duplicate key 'shape' in " + who);
          have_shape = true;
          t->shape = uint_array(who + " shape");
        } else if (k == "data_offsets") {
          if (have_off) err("duplicate key 'data_offsets' in " + who);
          have_off = true;
          auto v = uint_array(who + " data_offsets");
          if (v.size() != 2) err(who + ": data_offsets must hold exactly 2 integers");
          t->begin = v[0];
          t->end = v[1];
        } else {
          err("unknown field " + quote(k) + " in " + who);
        }
        ws();
        if (peek() == ',') {
          ++p_;
          continue;
        }
        if (peek() == '}') break;
        err("expected ',' or '}' in " + who);
      }
    }
    ++p_;
    if (!have_dtype) err(who + " has no dtype");
    if (!have_shape) err(who + " has no shape");
    if (!have_off) err(who + " has no data_offsets");
  }

  const char* b_;
  const char* p_;
  const char* e_;
  const std::string& path_;
};

std::string shape_str(const std::vector<uint64_t>& s) {
  std::string out = "[";
  for (std::size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

}  // namespace

void parse_safetensors(const uint8_t* buf, std::size_t len, const std::string& path,
                       std::vector<TensorInfo>* tensors, Metadata* metadata, bool* has_metadata,
                       std::size_t* data_start) {
  tensors->clear();
  metadata->clear();
  *has_metadata = false;
  if (len < 8)
    fail(path, "file is " + std::to_string(len) +
                   " bytes, too short for the 8-byte header length (empty or truncated file)");
  uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | buf[i];
  if (n > kMaxHeader)
    fail(path, "header length " + std::to_string(n) + " exceeds the limit of " +
                   std::to_string(kMaxHeader) + " bytes");
  if (n + 8 > len)
    fail(path, "header length " + std::to_string(n) + " runs past the end of the file (" +
                   std::to_string(len) + " bytes; truncated file?)");
  const uint8_t* h = buf + 8;
  const std::size_t bad = utf8_invalid_at(h, n);
  if (bad != n) fail(path, "header is not valid UTF-8 (byte " + std::to_string(bad) + ")");
  HeaderParser(reinterpret_cast<const char*>(h), n, path).parse(tensors, metadata, has_metadata);

  for (auto& t : *tensors) {
    const std::string who = "tensor " + quote(t.name);
    unsigned bits = 0;
    for (const auto& d : kDtypes)
      if (t.dtype_name == d.name) bits = d.bits;
    if (!bits) fail(path, who + " has unknown dtype " + quote(t.dtype_name));
    t.dtype = t.dtype_name == "F32" ? int(DType::F32)
            : t.dtype_name == "F16" ? int(DType::F16)
            : t.dtype_name == "BF16" ? int(DType::BF16) : -1;
    uint64_t numel = 1;
    for (uint64_t d : t.shape)
      if (__builtin_mul_overflow(numel, d, &numel))
        fail(path, who + " shape " + shape_str(t.shape) + " overflows 64 bits");
    t.numel = numel;
    uint64_t nbits = 0;
    if (__builtin_mul_overflow(numel, uint64_t(bits), &nbits))
      fail(path, who + " byte size overflows 64 bits");
    if (nbits % 8) fail(path, who + " does not fill a whole number of bytes");
    if (t.end < t.begin)
      fail(path, who + " data_offsets [" + std::to_string(t.begin) + ", " + std::to_string(t.end) +
                     "] end before they begin");
    if (t.end - t.begin != nbits / 8)
      fail(path, who + " has " + std::to_string(t.end - t.begin) + " bytes of data but dtype " +
                     t.dtype_name + " x shape " + shape_str(t.shape) + " needs " +
                     std::to_string(nbits / 8));
  }
  std::stable_sort(tensors->begin(), tensors->end(), [](const TensorInfo& a, const TensorInfo& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  uint64_t pos = 0;
  for (const auto& t : *tensors) {
    if (t.begin != pos)
      fail(path, "tensor " + quote(t.name) + " data_offsets [" + std::to_string(t.begin) + ", " +
                     std::to_string(t.end) + "] " +
                     (t.begin < pos ? "overlap the previous tensor" : "leave a gap") +
                     " (expected to start at " + std::to_string(pos) +
                     "; offsets must be contiguous from 0)");
    pos = t.end;
  }
  uint64_t expect = 0;
  if (__builtin_add_overflow(pos, n + 8, &expect) || expect != len)
    fail(path, "file is " + std::to_string(len) + " bytes but its header describes " +
                   (expect < pos ? std::string("more than 2^64") : std::to_string(expect)) +
                   (expect > len ? " (truncated file or offsets past the end)" : " (trailing data)"));
  *data_start = static_cast<std::size_t>(n + 8);
}

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw OsError(errno, path, "cannot open '" + path + "': " + std::strerror(errno));
  struct stat st;
  if (fstat(fd, &st) != 0) {
    const int e = errno;
    ::close(fd);
    throw OsError(e, path, "cannot stat '" + path + "': " + std::strerror(e));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    fail(path, "not a regular file");
  }
  const std::size_t len = static_cast<std::size_t>(st.st_size);
  void* addr = nullptr;
  if (len > 0) {
    addr = mmap(nullptr, len, PROT_READ, MAP_PRIVATE, fd, 0);
    if (addr == MAP_FAILED) {
      const int e = errno;
      ::close(fd);
      throw OsError(e, path, "cannot map '" + path + "': " + std::strerror(e));
    }
  }
  int kept = -1;
  if (len > 0 && keep_fd()) kept = fd;
  else ::close(fd);
  map_ = std::make_shared<const Mapping>(addr, len, kept);
  static const uint8_t empty[1] = {0};
  parse_safetensors(len ? static_cast<const uint8_t*>(addr) : empty, len, path, &tensors_,
                    &metadata_, &has_metadata_, &data_start_);
  sorted_by_name_.resize(tensors_.size());
  for (std::size_t i = 0; i < tensors_.size(); ++i) sorted_by_name_[i] = i;
  std::sort(sorted_by_name_.begin(), sorted_by_name_.end(),
            [&](std::size_t a, std::size_t b) { return tensors_[a].name < tensors_[b].name; });
}

const TensorInfo* SafetensorsFile::find(const std::string& name) const {
  auto it = std::lower_bound(sorted_by_name_.begin(), sorted_by_name_.end(), name,
                             [&](std::size_t i, const std::string& n) { return tensors_[i].name < n; });
  if (it == sorted_by_name_.end() || tensors_[*it].name != name) return nullptr;
  return &tensors_[*it];
}

// ---------------------------------------------------------------------------------------
// Writer

namespace {

// serde_json's string escaping: ", \, and control characters; everything else raw UTF-8.
void json_string(std::string& out, const std::string& s) {
  out += '"';
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c < 0x20) {
          char b[8];
          std::snprintf(b, sizeof b, "\\u%04x", c);
          out += b;
        } else {
          out += static_cast<char>(c);
        }
    }
  }
  out += '"';
}

}  // namespace

std::string serialize_header(const std::vector<WriterEntry>& entries, const Metadata* metadata) {
  std::string j = "{";
  bool first = true;
  if (metadata) {  // like safetensors: None -> no key, {} -> "__metadata__":{}
    j += "\"__metadata__\":{";
    bool f2 = true;
    for (const auto& kv : *metadata) {
      if (!f2) j += ',';
      f2 = false;
      json_string(j, kv.first);
      j += ':';
      json_string(j, kv.second);
    }
    j += '}';
    first = false;
  }
  uint64_t off = 0;
  for (const auto& e : entries) {
    uint64_t n = 1;
    for (uint64_t d : e.shape)
      if (__builtin_mul_overflow(n, d, &n)) throw std::invalid_argument("shape overflows");
    uint64_t bytes;
    if (__builtin_mul_overflow(n, uint64_t(dtype_size(e.dtype)), &bytes))
      throw std::invalid_argument("tensor size overflows");
    if (!first) j += ',';
    first = false;
    json_string(j, e.name);
    j += ":{\"dtype\":\"";
    j += dtype_name(e.dtype);
    j += "\",\"shape\":[";
    for (std::size_t i = 0; i < e.shape.size(); ++i) j += (i ? "," : "") + std::to_string(e.shape[i]);
    j += "],\"data_offsets\":[" + std::to_string(off) + ",";
    off += bytes;
    j += std::to_string(off) + "]}";
  }
  j += '}';
  j.append((8 - j.size() % 8) % 8, ' ');
  std::string out(8, '\0');
  uint64_t n = j.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + j;
}

namespace {

// All `len` bytes at `off` through `io` (pread or pwrite), retrying on EINTR and on short
// transfers; OsError naming the file otherwise.
template <class Ptr, class Io>
void full_io(Io io, Ptr p, std::size_t len, uint64_t off, const std::string& path, const char* verb,
             const char* short_what) {
  while (len) {
    const ssize_t n = io(p, std::min<std::size_t>(len, 1u << 30), static_cast<off_t>(off));
    if (n < 0) {
      if (errno == EINTR) continue;
      const int e = errno;
      throw OsError(e, path, std::string("cannot ") + verb + " '" + path + "': " + std::strerror(e));
    }
    if (n == 0) throw OsError(EIO, path, std::string("cannot ") + verb + " '" + path + "': " + short_what);
    p += n;
    len -= static_cast<std::size_t>(n);
    off += static_cast<uint64_t>(n);
  }
}

}  // namespace

void pwrite_all(int fd, const void* buf, std::size_t len, uint64_t off, const std::string& path) {
  full_io([fd](const char* p, std::size_t n, off_t o) { return ::pwrite(fd, p, n, o); },
          static_cast<const char*>(buf), len, off, path, "write", "short write");
}

void pread_all(int fd, void* buf, std::size_t len, uint64_t off, const std::string& path) {
  full_io([fd](char* p, std::size_t n, off_t o) { return ::pread(fd, p, n, o); }, static_cast<char*>(buf), len,
          off, path, "read", "short read (file truncated?)");
}

SafetensorsWriter::SafetensorsWriter(const std::string& path, std::vector<WriterEntry> entries,
                                     const Metadata* metadata)
    : path_(path), entries_(std::move(entries)) {
  std::unordered_set<std::string> names;
  for (const auto& e : entries_) {
    if (e.name == "__metadata__") throw std::invalid_argument("'__metadata__' cannot name a tensor");
    if (!names.insert(e.name).second)
      throw std::invalid_argument("duplicate tensor name " + quote(e.name));
    if (utf8_invalid_at(reinterpret_cast<const uint8_t*>(e.name.data()), e.name.size()) != e.name.size())
      throw std::invalid_argument("tensor name is not valid UTF-8");
  }
  if (metadata) {
    std::unordered_set<std::string> keys;
    for (const auto& kv : *metadata)
      if (!keys.insert(kv.first).second)
        throw std::invalid_argument("duplicate metadata key " + quote(kv.first));
  }
  const std::string header = serialize_header(entries_, metadata);
  if (header.size() - 8 > kMaxHeader)
    throw std::invalid_argument("header would exceed the 100000000-byte limit of readers");
  uint64_t off = header.size();
  for (const auto& e : entries_) {
    uint64_t n = 1;
    for (uint64_t d : e.shape) n *= d;  // checked in serialize_header
    numel_.push_back(n);
    offsets_.push_back(off);
    off += n * dtype_size(e.dtype);
  }
  written_.assign(entries_.size(), 0);

  // Temporary file next to the destination: same file system, so rename() is atomic.
  const std::size_t slash = path.rfind('/');
  const std::string dir = slash == std::string::npos ? std::string() : path.substr(0, slash + 1);
  const std::string base = slash == std::string::npos ? path : path.substr(slash + 1);
  static std::atomic<unsigned> counter{0};
  for (int attempt = 0; attempt < 100; ++attempt) {
    const auto t = std::chrono::steady_clock::now().time_since_epoch().count();
    tmp_path_ = dir + "." + base + ".tmp." + std::to_string(::getpid()) + "." +
                std::to_string(counter++) + "." + std::to_string(static_cast<unsigned long long>(t) % 1000000);
    fd_ = ::open(tmp_path_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd_ >= 0 || errno != EEXIST) break;
  }
  if (fd_ < 0) {
    const int e = errno;
    throw OsError(e, path, "cannot create a temporary file next to '" + path + "': " + std::strerror(e));
  }
  try {
    pwrite_all(fd_, header.data(), header.size(), 0, tmp_path_);
    if (::ftruncate(fd_, static_cast<off_t>(off)) != 0) {
      const int e = errno;
      throw OsError(e, tmp_path_, "cannot size '" + tmp_path_ + "': " + std::strerror(e));
    }
  } catch (...) {
    abort();
    throw;
  }
}

SafetensorsWriter::~SafetensorsWriter() { abort(); }

int SafetensorsWriter::index(const std::string& name) const {
  for (std::size_t i = 0; i < entries_.size(); ++i)
    if (entries_[i].name == name) return static_cast<int>(i);
  return -1;
}

void SafetensorsWriter::check_open() const {
  if (fd_ < 0)
    throw std::invalid_argument("SafetensorsWriter for '" + path_ + "' is already " +
                                (committed_ ? "committed" : "aborted"));
}

void SafetensorsWriter::pwrite_entry(int idx, uint64_t at, const void* data, std::size_t len) {
  pwrite_all(fd_, data, len, offsets_[idx] + at, tmp_path_);
}

void SafetensorsWriter::write_entry(int idx, const void* data, DType from) {
  const DType to = entries_[idx].dtype;
  const uint64_t n = numel_[idx];
  if (from == to) {
    pwrite_entry(idx, 0, data, n * dtype_size(to));
  } else if (from == DType::F32 && (to == DType::F16 || to == DType::BF16)) {
    const std::size_t C = 1 << 16;
    std::vector<uint16_t> buf(C);
    for (uint64_t i = 0; i < n; i += C) {
      const std::size_t c = static_cast<std::size_t>(std::min<uint64_t>(C, n - i));
      convert_from_f32(static_cast<const float*>(data) + i, buf.data(), to, c);
      pwrite_entry(idx, i * 2, buf.data(), c * 2);
    }
  } else {
    throw std::invalid_argument("tensor '" + entries_[idx].name + "' of '" + path_ + "' is " +
                                dtype_name(to) + ": cannot write it from " + dtype_name(from));
  }
  mark_written(idx);
}

void SafetensorsWriter::mark_written(int idx) {
  std::lock_guard<std::mutex> lk(mu_);
  written_[idx] = 1;
}

void SafetensorsWriter::pin() {
  std::lock_guard<std::mutex> lk(mu_);
  check_open();
  ++pins_;
}

void SafetensorsWriter::unpin() noexcept {
  std::lock_guard<std::mutex> lk(mu_);
  --pins_;
}

void SafetensorsWriter::abort_checked() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (pins_ > 0)
      throw std::invalid_argument("cannot abort the writer for '" + path_ + "': a write is in progress");
  }
  abort();
}

void SafetensorsWriter::commit() {
  std::lock_guard<std::mutex> lk(mu_);
  check_open();
  if (pins_ > 0)
    throw std::invalid_argument("cannot commit '" + path_ + "': a write is in progress in another thread");
  std::string missing;
  std::size_t n_missing = 0;
  for (std::size_t i = 0; i < entries_.size(); ++i)
    if (!written_[i]) {
      if (n_missing < 5) missing += (n_missing ? ", " : "") + quote(entries_[i].name);
      ++n_missing;
    }
  if (n_missing)
    throw std::invalid_argument("cannot commit '" + path_ + "': " + std::to_string(n_missing) +
                                " tensor(s) not written: " + missing + (n_missing > 5 ? ", ..." : ""));
  if (::fsync(fd_) != 0) {
    const int e = errno;
    throw OsError(e, tmp_path_, "fsync failed on '" + tmp_path_ + "': " + std::strerror(e));
  }
  if (::close(fd_) != 0) {
    const int e = errno;
    fd_ = -1;
    ::unlink(tmp_path_.c_str());
    throw OsError(e, tmp_path_, "close failed on '" + tmp_path_ + "': " + std::strerror(e));
  }
  fd_ = -1;
  if (::rename(tmp_path_.c_str(), path_.c_str()) != 0) {
    const int e = errno;
    ::unlink(tmp_path_.c_str());
    throw OsError(e, path_, "cannot rename '" + tmp_path_ + "' to '" + path_ + "': " + std::strerror(e));
  }
  committed_ = true;
  const std::size_t slash = path_.rfind('/');
  const std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path_.substr(0, slash));
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);  // best effort: makes the rename durable
    ::close(dfd);
  }
}

void SafetensorsWriter::abort() noexcept {
  if (fd_ >= 0) {
    ::close(fd_);
    fd_ = -1;
    ::unlink(tmp_path_.c_str());
  }
}

}  // namespace loramix
