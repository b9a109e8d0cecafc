// What was checked or derived from a structure tensor (offsets, indices), kept until the
// tensor changes.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/intrusive_ptr.h>

#include <memory>
#include <mutex>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace sparsefx {

// A record holds a weak reference to the tensor (so its address is not reused while the
// record lives), its version counter (bumped by every in-place write, DST updates included),
// storage pointer, shape and dtype, the kind of record and its parameters, and a payload:
// what was derived (or a marker: "the check passed"). Writes that bypass the version counter
// (through .data) are not seen; the kernels bounds-check the structure themselves, so such a
// write can give a wrong result but never reads outside the inputs.
// What a record holds: each pattern declares its own kinds beside the code that uses them
// (``inline constexpr RecordKind kDiagOffsets{"diag.offsets"};``), named "<pattern>.<what>"
// so that the names of different patterns never meet; nothing here lists them.
struct RecordKind {
  std::string_view name;
};

class StructureCache {
 public:
  using Payload = std::shared_ptr<const void>;

  // The payload recorded for `tensor` as it is now, or null.
  Payload find(const at::Tensor& tensor, RecordKind kind, int64_t a, int64_t b) {
    auto* impl = tensor.unsafeGetTensorImpl();
    if (!impl->version_counter().enabled()) return nullptr;  // inference tensors: no version
    std::lock_guard<std::mutex> lock(mutex_);
    auto found = records_.find(Key{impl, kind.name, a, b});
    if (found == records_.end() || found->second.owner.expired() ||
        !(found->second.stamp == stamp_of(tensor)))
      return nullptr;
    return found->second.payload;
  }

  void remember(const at::Tensor& tensor, RecordKind kind, int64_t a, int64_t b, Payload payload) {
    auto* impl = tensor.unsafeGetTensorImpl();
    if (!impl->version_counter().enabled()) return;
    std::lock_guard<std::mutex> lock(mutex_);
    // derived payloads can be large: drop those of dead tensors whenever one is added
    if (records_.size() >= kSweepAt || payload != marker()) sweep();
    records_.insert_or_assign(
        Key{impl, kind.name, a, b},
        Record{c10::weak_intrusive_ptr<c10::TensorImpl>(tensor.getIntrusivePtr()),
               stamp_of(tensor), std::move(payload)});
  }

  bool verified(const at::Tensor& tensor, RecordKind kind, int64_t a, int64_t b) {
    return find(tensor, kind, a, b) != nullptr;
  }

  void remember_verified(const at::Tensor& tensor, RecordKind kind, int64_t a, int64_t b) {
    remember(tensor, kind, a, b, marker());
  }

 private:
  static const Payload& marker() {
    static const Payload passed = std::make_shared<const int>(1);
    return passed;
  }

  struct Key {
    const c10::TensorImpl* impl;
    std::string_view kind;
    int64_t a, b;
    bool operator==(const Key& other) const {
      return impl == other.impl && kind == other.kind && a == other.a && b == other.b;
    }
  };
  struct KeyHash {
    size_t operator()(const Key& key) const {
      size_t h = std::hash<const void*>()(key.impl) ^ std::hash<std::string_view>()(key.kind);
      for (int64_t part : {key.a, key.b})
        h ^= std::hash<int64_t>()(part) + 0x9e3779b97f4a7c15ULL + (h << 6) + (h >> 2);
      return h;
    }
  };
  struct Stamp {
    uint32_t version;
    const void* data;
    std::vector<int64_t> sizes;
    at::ScalarType dtype;
    bool operator==(const Stamp& other) const {
      return version == other.version && data == other.data && sizes == other.sizes &&
             dtype == other.dtype;
    }
  };
  struct Record {
    c10::weak_intrusive_ptr<c10::TensorImpl> owner;
    Stamp stamp;
    Payload payload;
  };

  static Stamp stamp_of(const at::Tensor& tensor) {
    return Stamp{tensor.unsafeGetTensorImpl()->version_counter().current_version(),
                 tensor.data_ptr(), tensor.sizes().vec(), tensor.scalar_type()};
  }

  void sweep() {
    for (auto it = records_.begin(); it != records_.end();)
      it = it->second.owner.expired() ? records_.erase(it) : std::next(it);
  }

  static constexpr size_t kSweepAt = 4096;
  std::mutex mutex_;
  std::unordered_map<Key, Record, KeyHash> records_;
};

inline StructureCache& structure_cache() {
  static StructureCache cache;
  return cache;
}

}  // namespace sparsefx
