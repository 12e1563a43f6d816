// pmem_support.h — the few things Swift's Glibc module does not give us:
// epoll, eventfd, accept4, MAP_SYNC mapping, and cache-line write-back
// instructions chosen by CPUID at run time. Compiled with _GNU_SOURCE.
#ifndef PMEM_SUPPORT_H
#define PMEM_SUPPORT_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <pthread.h>
#include <spawn.h>

#ifdef __cplusplus
extern "C" {
#endif

// ---- CPU features and persistence primitives -------------------------------

/// Bits returned by pmem_cpu_features().
enum {
  PMEM_CPU_CLFLUSH = 1 << 0,
  PMEM_CPU_CLFLUSHOPT = 1 << 1,
  PMEM_CPU_CLWB = 1 << 2,
  PMEM_CPU_SSE42 = 1 << 3,
  PMEM_CPU_AVX2 = 1 << 4,
};

/// Which instruction pmem_flush() uses.
enum pmem_flush_kind {
  PMEM_FLUSH_NONE = 0,        // no flush instruction (not x86): stores only, msync does the work
  PMEM_FLUSH_CLFLUSH = 1,
  PMEM_FLUSH_CLFLUSHOPT = 2,
  PMEM_FLUSH_CLWB = 3,
};

/// CPUID leaves 1 and 7, decoded into PMEM_CPU_* bits.
uint32_t pmem_cpu_features(void);

/// Chooses the best flush instruction the CPU has (CLWB, else CLFLUSHOPT, else CLFLUSH)
/// unless `forced` names one; returns the kind in use. Thread-safe to call repeatedly.
int pmem_flush_select(int forced);

/// The flush instruction currently selected.
int pmem_flush_current(void);

/// Writes back every cache line overlapping [addr, addr+len) with the selected instruction.
/// Does not order: follow with pmem_drain().
void pmem_flush(const void *addr, size_t len);

/// SFENCE: orders all earlier flushes and non-temporal stores of this thread.
void pmem_drain(void);

/// Copies with non-temporal (streaming) stores where aligned, flushing the unaligned edges;
/// the data is on its way to media without polluting the cache. Follow with pmem_drain().
void pmem_memcpy_nt(void *dst, const void *src, size_t len);

/// Fills with zeroes using non-temporal stores (edges flushed). Follow with pmem_drain().
void pmem_memzero_nt(void *dst, size_t len);

/// CRC-32C (Castagnoli), hardware SSE4.2 when present. Pass 0 to start.
uint32_t pmem_crc32c(uint32_t crc, const void *data, size_t len);

// ---- Atomics on shared (pool) memory -----------------------------------------

/// Atomic fetch-or / fetch-and / load / store / compare-exchange on a 64-bit word in mapped memory.
uint64_t pmem_atomic_or64(uint64_t *word, uint64_t bits);
uint64_t pmem_atomic_and64(uint64_t *word, uint64_t bits);
static inline uint64_t pmem_atomic_load64(const uint64_t *word) { return __atomic_load_n(word, __ATOMIC_ACQUIRE); }
static inline void pmem_atomic_store64(uint64_t *word, uint64_t value) { __atomic_store_n(word, value, __ATOMIC_RELEASE); }
int pmem_atomic_cas64(uint64_t *word, uint64_t expected, uint64_t desired);
uint32_t pmem_atomic_load32(const uint32_t *word);
/// Sequentially consistent store (a store that later loads of this thread cannot pass).
void pmem_atomic_store64_seqcst(uint64_t *word, uint64_t value);

/// A pthread rwlock that prefers writers (so a commit is not starved by a stream of writers).
int pmem_rwlock_init_writer_preferring(pthread_rwlock_t *lock);
void pmem_atomic_store32(uint32_t *word, uint32_t value);

/// fallocate(FALLOC_FL_PUNCH_HOLE|FALLOC_FL_KEEP_SIZE): 0 or -1 with errno.
int pmem_punch_hole(int fd, int64_t offset, int64_t length);

/// fallocate(mode 0): reserves the file's blocks. 0 or -1 with errno.
int pmem_fallocate(int fd, int64_t offset, int64_t length);

/// madvise(MADV_POPULATE_WRITE) (Linux 5.14): faults pages in writable, without writing.
int pmem_populate_write(void *addr, size_t length);

/// mallopt(M_MMAP_THRESHOLD, bytes): heap blocks of `bytes` or more are always mappings of
/// their own (and glibc stops raising the threshold as large blocks are freed). 1 on success.
int pmem_set_mmap_threshold(size_t bytes);

/// sync_file_range(2) over [offset, offset+length): with `wait`, WAIT_BEFORE|WRITE|WAIT_AFTER
/// (the range's dirty pages are written and waited for), else WRITE (writing starts). Neither
/// writes file metadata nor flushes the device's volatile cache. 0 or -1 with errno.
int pmem_write_back(int fd, int64_t offset, int64_t length, int wait);

/// The f_type of the file system holding `fd` (fstatfs), or -1 with errno.
int64_t pmem_fs_type(int fd);

/// Size in bytes of a block device (BLKGETSIZE64), or -1.
int64_t pmem_block_device_size(int fd);

// ---- Memory mapping ----------------------------------------------------------

/// mmap(MAP_SHARED_VALIDATE|MAP_SYNC); returns MAP_FAILED with errno on failure
/// (EOPNOTSUPP or EINVAL where the file is not on DAX).
void *pmem_mmap_sync(int fd, size_t length, int writable);

/// Plain mmap(MAP_SHARED).
void *pmem_mmap_shared(int fd, size_t length, int writable);

// ---- epoll, eventfd, accept4 -------------------------------------------------

int pmem_epoll_create(void);
/// EPOLL_CTL_ADD for EPOLLIN with `token` as the event data.
int pmem_epoll_add(int epfd, int fd, uint64_t token);
/// Waits for up to `max` events, writing their tokens; returns count or -1.
int pmem_epoll_wait(int epfd, uint64_t *tokens, int max, int timeout_ms);

int pmem_eventfd(void);
int pmem_eventfd_signal(int fd);

/// accept4(fd, NULL, NULL, SOCK_CLOEXEC)
int pmem_accept(int fd);

#include <pthread.h>
/// pthread_setname_np (at most 15 characters).
int pmem_set_thread_name(pthread_t thread, const char *name);

/// The kernel thread id of the caller.
int pmem_gettid(void);

/// SO_PEERCRED of a Unix socket: writes the peer's uid and pid; 0 or -1.
int pmem_peer_credentials(int fd, uint32_t *uid, int32_t *pid);

/// memfd_create(name, MFD_CLOEXEC): an anonymous file to share by descriptor.
int pmem_memfd(const char *name);

/// sendmsg of `len` bytes with up to 4 descriptors attached (SCM_RIGHTS), MSG_NOSIGNAL.
/// Returns bytes sent or -1.
ssize_t pmem_send_with_fds(int sock, const void *buf, size_t len, const int *fds, int nfds);

/// recvmsg of up to `len` bytes; descriptors received (at most `maxfds`) are stored in `fds`
/// and their number in `*nfds`. Returns bytes received (0 at end of stream) or -1.
ssize_t pmem_recv_with_fds(int sock, void *buf, size_t len, int *fds, int maxfds, int *nfds);

/// Sets TCP_NODELAY.
int pmem_tcp_nodelay(int fd);

/// pipe2(O_CLOEXEC): 0 or -1 with errno.
int pmem_pipe_cloexec(int fds[2]);

/// posix_spawn_file_actions_addclosefrom_np (a GNU extension): the child closes every
/// descriptor from `from` up. 0 or an error number.
int pmem_spawn_actions_closefrom(posix_spawn_file_actions_t *actions, int from);

/// pidfd_open(2) with PIDFD_NONBLOCK clear: a descriptor that refers to one process (readable
/// once it has ended), or -1 with errno.
int pmem_pidfd_open(pid_t pid);

/// pidfd_send_signal(2): 0 or -1 with errno (ESRCH once the process has ended).
int pmem_pidfd_send_signal(int pidfd, int sig);

/// prctl(PR_SET_PDEATHSIG, sig): the kernel sends `sig` to this process when its parent
/// exits. 0 or -1 with errno.
int pmem_set_parent_death_signal(int sig);

/// syslog(3) of one preformatted message (syslog itself is variadic).
void pmem_syslog(int priority, const char *message);

// ---- Counters for metrics ----------------------------------------------------

/// Adds to a counter that only the calling thread writes: a relaxed load and a relaxed store,
/// no locked instruction (a plain add on x86). Other threads read it with pmem_counter_load.
static inline void pmem_counter_add(uint64_t *counter, uint64_t n) {
  __atomic_store_n(counter, __atomic_load_n(counter, __ATOMIC_RELAXED) + n, __ATOMIC_RELAXED);
}

/// Adds to a counter that several threads write (an atomic fetch-add, relaxed).
static inline void pmem_counter_add_shared(uint64_t *counter, uint64_t n) {
  __atomic_fetch_add(counter, n, __ATOMIC_RELAXED);
}

/// Reads a counter another thread may be adding to (relaxed).
static inline uint64_t pmem_counter_load(const uint64_t *counter) {
  return __atomic_load_n(counter, __ATOMIC_RELAXED);
}

#ifdef __cplusplus
}
#endif
#endif
