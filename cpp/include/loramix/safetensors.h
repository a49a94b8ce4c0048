// safetensors read (memory-mapped, validated) and write (header up front, streamed data,
// temporary file + fsync + atomic rename).
//
// Reader contract (mirrors huggingface/safetensors `tensor.rs`, stricter where noted):
//  - file >= 8 bytes; header length N (u64 LE) <= 100,000,000; 8 + N <= file length;
//  - the header is valid UTF-8 and one JSON object (strict JSON; trailing whitespace only);
//    keys unique at every level; `__metadata__` is null or an object of string -> string;
//    every other key is a tensor {"dtype": str, "shape": [u64...], "data_offsets": [u64, u64]}
//    with no other fields (stricter: the reference ignores unknown fields); dtype one of the
//    names the reference knows (BOOL, U8, I8, F8_*, F4, F6_*, I16, U16, F16, BF16, I32, U32,
//    F32, F64, I64, U64, C64);
//  - tensors sorted by data_offsets are contiguous from 0 (begin == previous end, end >=
//    begin); bytes == dtype bits x prod(shape) / 8 with checked arithmetic;
//  - file length == 8 + N + last end exactly.
//  Any violation throws FormatError("invalid safetensors file '<path>': <what>").
//  The mapping is shared (std::shared_ptr<const Mapping>); views keep it alive. The mapping
//  also keeps the file's descriptor open (Mapping::fd) while fewer than half of the process's
//  RLIMIT_NOFILE descriptors are so kept, so that the streaming kernels can read tensors with
//  pread instead of through the mapping (wsum.h); beyond that budget fd is -1 and they read
//  through the mapping.
//
// Writer contract: the entries' order is the order of the data in the file and of the keys
// in the header; the header is serialized exactly like safetensors (serde_json, compact,
// `__metadata__` first when given (even empty, as the library does), padded with spaces to a multiple of 8), so
// rewriting a file read by SafetensorsFile (same order, same metadata order) is byte-identical.
// Data go to a temporary file in the destination folder (O_EXCL, never an existing file);
// commit() checks that every tensor was written, fsyncs, renames over the destination (an
// existing file, even a mapped one, is replaced, never truncated) and fsyncs the folder.
// Destruction without commit() removes the temporary file.
#pragma once
#include <cstdint>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "loramix/dtype.h"

namespace loramix {

struct FormatError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

// An operating-system error on `path` (errno kept for OSError).
struct OsError : std::runtime_error {
  OsError(int err, std::string path, const std::string& what)
      : std::runtime_error(what), err(err), path(std::move(path)) {}
  int err;
  std::string path;
};

struct Mapping {
  Mapping(void* addr, std::size_t len, int fd = -1) : addr(addr), len(len), fd(fd) {}
  ~Mapping();  // unmaps; closes fd if >= 0
  Mapping(const Mapping&) = delete;
  Mapping& operator=(const Mapping&) = delete;
  void* addr;
  std::size_t len;
  int fd;  // the mapped file, open for pread, or -1
};

struct TensorInfo {
  std::string name;
  std::string dtype_name;  // as written in the header
  int dtype = -1;          // a DType value for F32/F16/BF16, -1 for others
  std::vector<uint64_t> shape;
  uint64_t begin = 0, end = 0;  // byte offsets relative to the data section
  uint64_t numel = 0;
  std::size_t json_index = 0;   // position of the key in the header
};

using Metadata = std::vector<std::pair<std::string, std::string>>;

// Parses and validates a whole file image (header + data). `path` is used in messages only.
// Returns tensors in data order (ties kept in header order); fills metadata in header order.
void parse_safetensors(const uint8_t* buf, std::size_t len, const std::string& path,
                       std::vector<TensorInfo>* tensors, Metadata* metadata, bool* has_metadata,
                       std::size_t* data_start);

class SafetensorsFile {
 public:
  explicit SafetensorsFile(const std::string& path);
  const std::string& path() const { return path_; }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const Metadata& metadata() const { return metadata_; }
  bool has_metadata() const { return has_metadata_; }  // the header had a __metadata__ object
  const TensorInfo* find(const std::string& name) const;
  const uint8_t* data(const TensorInfo& t) const {
    return static_cast<const uint8_t*>(map_->addr) + data_start_ + t.begin;
  }
  const std::shared_ptr<const Mapping>& mapping() const { return map_; }

 private:
  std::string path_;
  std::shared_ptr<const Mapping> map_;
  std::vector<TensorInfo> tensors_;
  std::vector<std::size_t> sorted_by_name_;
  Metadata metadata_;
  bool has_metadata_ = false;
  std::size_t data_start_ = 0;
};

struct WriterEntry {
  std::string name;
  DType dtype;
  std::vector<uint64_t> shape;
};

// The exact bytes safetensors would write before the data: 8-byte length + padded header.
std::string serialize_header(const std::vector<WriterEntry>& entries, const Metadata* metadata);

class SafetensorsWriter {
 public:
  SafetensorsWriter(const std::string& path, std::vector<WriterEntry> entries,
                    const Metadata* metadata);
  ~SafetensorsWriter();
  SafetensorsWriter(const SafetensorsWriter&) = delete;
  SafetensorsWriter& operator=(const SafetensorsWriter&) = delete;

  const std::string& path() const { return path_; }
  const std::string& temp_path() const { return tmp_path_; }
  const std::vector<WriterEntry>& entries() const { return entries_; }
  // Index of `name` or -1.
  int index(const std::string& name) const;
  uint64_t numel(int idx) const { return numel_[idx]; }
  // Absolute file offset of entry idx's first byte.
  uint64_t offset(int idx) const { return offsets_[idx]; }
  int fd() const { return fd_; }
  bool open() const { return fd_ >= 0; }
  // Writes `len` bytes at byte `at` within entry idx (thread-safe, any order).
  void pwrite_entry(int idx, uint64_t at, const void* data, std::size_t len);
  // Writes entry idx whole from numel(idx) elements at `data` of dtype `from`, then marks it
  // written: `from` is the entry's dtype (bytes copied as they are) or F32 (rounded to the
  // entry's F16/BF16 as convert_from_f32 does, in chunks through a 128 KB buffer). Throws
  // std::invalid_argument for any other `from`. Thread-safe like pwrite_entry.
  void write_entry(int idx, const void* data, DType from);
  // Throws unless the writer is open. Marks entry idx as complete.
  void mark_written(int idx);
  void check_open() const;
  // Pin the writer open around a write done without the GIL (another thread's commit() or
  // abort_checked() then fails instead of closing the file under the write).
  void pin();
  void unpin() noexcept;
  void commit();
  // abort() unless a write is in flight (then throws).
  void abort_checked();
  void abort() noexcept;

 private:
  std::string path_, tmp_path_;
  std::vector<WriterEntry> entries_;
  std::vector<uint64_t> numel_, offsets_;
  std::vector<char> written_;
  std::mutex mu_;
  int fd_ = -1;
  int pins_ = 0;
  bool committed_ = false;
};

// Writes all of `buf` at `off` (retries short writes and EINTR). Throws OsError.
void pwrite_all(int fd, const void* buf, std::size_t len, uint64_t off, const std::string& path);

// Reads exactly `len` bytes at `off` into `buf` (retries short reads and EINTR). Throws
// OsError (EIO "short read" at end of file: the file was truncated after it was opened).
void pread_all(int fd, void* buf, std::size_t len, uint64_t off, const std::string& path);

}  // namespace loramix
