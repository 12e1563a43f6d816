// See pmem_support.h.
#include "pmem_support.h"

#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <malloc.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <syslog.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/vfs.h>
#include <unistd.h>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <immintrin.h>
#define PMEM_X86 1
#endif

#define CACHELINE 64

uint32_t pmem_cpu_features(void) {
  uint32_t f = 0;
#ifdef PMEM_X86
  unsigned a, b, c, d;
  if (__get_cpuid(1, &a, &b, &c, &d)) {
    if (d & (1u << 19)) f |= PMEM_CPU_CLFLUSH;
    if (c & (1u << 20)) f |= PMEM_CPU_SSE42;
  }
  if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) {
    if (b & (1u << 23)) f |= PMEM_CPU_CLFLUSHOPT;
    if (b & (1u << 24)) f |= PMEM_CPU_CLWB;
    if (b & (1u << 5)) f |= PMEM_CPU_AVX2;
  }
#endif
  return f;
}

#ifdef PMEM_X86
__attribute__((target("clflushopt"))) static void flush_clflushopt(const void *addr, size_t len) {
  uintptr_t p = (uintptr_t)addr & ~(uintptr_t)(CACHELINE - 1);
  uintptr_t end = (uintptr_t)addr + len;
  for (; p < end; p += CACHELINE) _mm_clflushopt((void *)p);
}
__attribute__((target("clwb"))) static void flush_clwb(const void *addr, size_t len) {
  uintptr_t p = (uintptr_t)addr & ~(uintptr_t)(CACHELINE - 1);
  uintptr_t end = (uintptr_t)addr + len;
  for (; p < end; p += CACHELINE) _mm_clwb((void *)p);
}
static void flush_clflush(const void *addr, size_t len) {
  uintptr_t p = (uintptr_t)addr & ~(uintptr_t)(CACHELINE - 1);
  uintptr_t end = (uintptr_t)addr + len;
  for (; p < end; p += CACHELINE) _mm_clflush((void *)p);
}
#endif

static void flush_none(const void *addr, size_t len) { (void)addr; (void)len; }

typedef void (*flush_fn)(const void *, size_t);
static _Atomic(flush_fn) current_flush = flush_none;
static _Atomic int current_kind = -1;

int pmem_flush_select(int forced) {
  int kind = PMEM_FLUSH_NONE;
#ifdef PMEM_X86
  uint32_t f = pmem_cpu_features();
  if (forced > 0) {
    kind = forced;
    if (kind == PMEM_FLUSH_CLWB && !(f & PMEM_CPU_CLWB)) kind = PMEM_FLUSH_NONE;
    if (kind == PMEM_FLUSH_CLFLUSHOPT && !(f & PMEM_CPU_CLFLUSHOPT)) kind = PMEM_FLUSH_NONE;
    if (kind == PMEM_FLUSH_CLFLUSH && !(f & PMEM_CPU_CLFLUSH)) kind = PMEM_FLUSH_NONE;
  } else if (f & PMEM_CPU_CLWB) kind = PMEM_FLUSH_CLWB;
  else if (f & PMEM_CPU_CLFLUSHOPT) kind = PMEM_FLUSH_CLFLUSHOPT;
  else if (f & PMEM_CPU_CLFLUSH) kind = PMEM_FLUSH_CLFLUSH;
  switch (kind) {
    case PMEM_FLUSH_CLWB: atomic_store(&current_flush, flush_clwb); break;
    case PMEM_FLUSH_CLFLUSHOPT: atomic_store(&current_flush, flush_clflushopt); break;
    case PMEM_FLUSH_CLFLUSH: atomic_store(&current_flush, flush_clflush); break;
    default: atomic_store(&current_flush, flush_none); break;
  }
#else
  (void)forced;
#endif
  atomic_store(&current_kind, kind);
  return kind;
}

int pmem_flush_current(void) {
  int k = atomic_load(&current_kind);
  return k < 0 ? pmem_flush_select(0) : k;
}

void pmem_flush(const void *addr, size_t len) {
  if (atomic_load_explicit(&current_kind, memory_order_relaxed) < 0) pmem_flush_select(0);
  atomic_load_explicit(&current_flush, memory_order_relaxed)(addr, len);
}

void pmem_drain(void) {
#ifdef PMEM_X86
  _mm_sfence();
#else
  atomic_thread_fence(memory_order_seq_cst);
#endif
}

void pmem_memcpy_nt(void *dst, const void *src, size_t len) {
#ifdef PMEM_X86
  unsigned char *d = dst;
  const unsigned char *s = src;
  // Head up to 16-byte alignment of the destination.
  size_t head = (16 - ((uintptr_t)d & 15)) & 15;
  if (head > len) head = len;
  if (head) {
    memcpy(d, s, head);
    pmem_flush(d, head);
    d += head; s += head; len -= head;
  }
  while (len >= 64) {
    __m128i a = _mm_loadu_si128((const __m128i *)(s + 0));
    __m128i b = _mm_loadu_si128((const __m128i *)(s + 16));
    __m128i c = _mm_loadu_si128((const __m128i *)(s + 32));
    __m128i e = _mm_loadu_si128((const __m128i *)(s + 48));
    _mm_stream_si128((__m128i *)(d + 0), a);
    _mm_stream_si128((__m128i *)(d + 16), b);
    _mm_stream_si128((__m128i *)(d + 32), c);
    _mm_stream_si128((__m128i *)(d + 48), e);
    d += 64; s += 64; len -= 64;
  }
  while (len >= 16) {
    _mm_stream_si128((__m128i *)d, _mm_loadu_si128((const __m128i *)s));
    d += 16; s += 16; len -= 16;
  }
  if (len) {
    memcpy(d, s, len);
    pmem_flush(d, len);
  }
#else
  memcpy(dst, src, len);
  pmem_flush(dst, len);
#endif
}

void pmem_memzero_nt(void *dst, size_t len) {
#ifdef PMEM_X86
  unsigned char *d = dst;
  size_t head = (16 - ((uintptr_t)d & 15)) & 15;
  if (head > len) head = len;
  if (head) {
    memset(d, 0, head);
    pmem_flush(d, head);
    d += head; len -= head;
  }
  __m128i z = _mm_setzero_si128();
  while (len >= 16) {
    _mm_stream_si128((__m128i *)d, z);
    d += 16; len -= 16;
  }
  if (len) {
    memset(d, 0, len);
    pmem_flush(d, len);
  }
#else
  memset(dst, 0, len);
  pmem_flush(dst, len);
#endif
}

// ---- CRC-32C ---------------------------------------------------------------

static uint32_t crc_table[256];
static _Atomic int crc_table_ready = 0;

static void crc_table_init(void) {
  for (uint32_t i = 0; i < 256; i++) {
    uint32_t c = i;
    for (int k = 0; k < 8; k++) c = (c & 1) ? (c >> 1) ^ 0x82F63B78u : c >> 1;
    crc_table[i] = c;
  }
  atomic_store(&crc_table_ready, 1);
}

static uint32_t crc32c_soft(uint32_t crc, const unsigned char *p, size_t len) {
  if (!atomic_load(&crc_table_ready)) crc_table_init();
  while (len--) crc = crc_table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
  return crc;
}

#ifdef PMEM_X86
__attribute__((target("sse4.2"))) static uint32_t crc32c_hw(uint32_t crc, const unsigned char *p, size_t len) {
  uint64_t c = crc;
  while (len && ((uintptr_t)p & 7)) { c = _mm_crc32_u8((uint32_t)c, *p++); len--; }
  while (len >= 8) {
    uint64_t v;
    memcpy(&v, p, 8);
    c = _mm_crc32_u64(c, v);
    p += 8; len -= 8;
  }
  while (len--) c = _mm_crc32_u8((uint32_t)c, *p++);
  return (uint32_t)c;
}
#endif

uint32_t pmem_crc32c(uint32_t crc, const void *data, size_t len) {
  crc = ~crc;
#ifdef PMEM_X86
  /* Chosen once; threads may race to choose, so the flag is read and written atomically. */
  static int hw = -1;
  int use = __atomic_load_n(&hw, __ATOMIC_RELAXED);
  if (use < 0) {
    use = (pmem_cpu_features() & PMEM_CPU_SSE42) ? 1 : 0;
    __atomic_store_n(&hw, use, __ATOMIC_RELAXED);
  }
  crc = use ? crc32c_hw(crc, data, len) : crc32c_soft(crc, data, len);
#else
  crc = crc32c_soft(crc, data, len);
#endif
  return ~crc;
}

// ---- Atomics -------------------------------------------------------------------

uint64_t pmem_atomic_or64(uint64_t *word, uint64_t bits) { return __atomic_fetch_or(word, bits, __ATOMIC_SEQ_CST); }
uint64_t pmem_atomic_and64(uint64_t *word, uint64_t bits) { return __atomic_fetch_and(word, bits, __ATOMIC_SEQ_CST); }
int pmem_atomic_cas64(uint64_t *word, uint64_t expected, uint64_t desired) {
  return __atomic_compare_exchange_n(word, &expected, desired, 0, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);
}
void pmem_atomic_store64_seqcst(uint64_t *word, uint64_t value) { __atomic_store_n(word, value, __ATOMIC_SEQ_CST); }

int pmem_rwlock_init_writer_preferring(pthread_rwlock_t *lock) {
  pthread_rwlockattr_t attr;
  pthread_rwlockattr_init(&attr);
  pthread_rwlockattr_setkind_np(&attr, PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
  int r = pthread_rwlock_init(lock, &attr);
  pthread_rwlockattr_destroy(&attr);
  return r;
}

uint32_t pmem_atomic_load32(const uint32_t *word) { return __atomic_load_n(word, __ATOMIC_ACQUIRE); }
void pmem_atomic_store32(uint32_t *word, uint32_t value) { __atomic_store_n(word, value, __ATOMIC_RELEASE); }

int pmem_punch_hole(int fd, int64_t offset, int64_t length) {
  return fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);
}

int pmem_fallocate(int fd, int64_t offset, int64_t length) { return fallocate(fd, 0, offset, length); }

#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
int pmem_populate_write(void *addr, size_t length) { return madvise(addr, length, MADV_POPULATE_WRITE); }

int pmem_set_mmap_threshold(size_t bytes) { return mallopt(M_MMAP_THRESHOLD, (int)bytes); }

int pmem_write_back(int fd, int64_t offset, int64_t length, int wait) {
  unsigned flags = wait ? SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER
                        : SYNC_FILE_RANGE_WRITE;
  return sync_file_range(fd, offset, length, flags);
}

int64_t pmem_fs_type(int fd) {
  struct statfs s;
  if (fstatfs(fd, &s) != 0) return -1;
  return (int64_t)(uint64_t)(unsigned long)s.f_type;
}

int64_t pmem_block_device_size(int fd) {
  uint64_t size = 0;
  if (ioctl(fd, BLKGETSIZE64, &size) != 0) return -1;
  return (int64_t)size;
}

// ---- Mapping -----------------------------------------------------------------

void *pmem_mmap_sync(int fd, size_t length, int writable) {
#if defined(MAP_SYNC) && defined(MAP_SHARED_VALIDATE)
  int prot = PROT_READ | (writable ? PROT_WRITE : 0);
  return mmap(NULL, length, prot, MAP_SHARED_VALIDATE | MAP_SYNC, fd, 0);
#else
  (void)fd; (void)length; (void)writable;
  errno = EOPNOTSUPP;
  return MAP_FAILED;
#endif
}

void *pmem_mmap_shared(int fd, size_t length, int writable) {
  int prot = PROT_READ | (writable ? PROT_WRITE : 0);
  return mmap(NULL, length, prot, MAP_SHARED, fd, 0);
}

// ---- epoll, eventfd, accept4 -------------------------------------------------

int pmem_epoll_create(void) { return epoll_create1(EPOLL_CLOEXEC); }

int pmem_epoll_add(int epfd, int fd, uint64_t token) {
  struct epoll_event ev;
  memset(&ev, 0, sizeof ev);
  ev.events = EPOLLIN;
  ev.data.u64 = token;
  return epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev);
}

int pmem_epoll_wait(int epfd, uint64_t *tokens, int max, int timeout_ms) {
  struct epoll_event evs[64];
  if (max > 64) max = 64;
  int n = epoll_wait(epfd, evs, max, timeout_ms);
  for (int i = 0; i < n; i++) tokens[i] = evs[i].data.u64;
  return n;
}

int pmem_eventfd(void) { return eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK); }

int pmem_eventfd_signal(int fd) {
  uint64_t one = 1;
  return write(fd, &one, sizeof one) == sizeof one ? 0 : -1;
}

int pmem_accept(int fd) { return accept4(fd, NULL, NULL, SOCK_CLOEXEC); }

int pmem_set_thread_name(pthread_t thread, const char *name) { return pthread_setname_np(thread, name); }

int pmem_gettid(void) { return (int)syscall(SYS_gettid); }

int pmem_peer_credentials(int fd, uint32_t *uid, int32_t *pid) {
  struct ucred cred;
  socklen_t len = sizeof cred;
  if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) != 0) return -1;
  *uid = cred.uid;
  *pid = cred.pid;
  return 0;
}

int pmem_memfd(const char *name) { return (int)syscall(SYS_memfd_create, name, 1u /* MFD_CLOEXEC */); }

ssize_t pmem_send_with_fds(int sock, const void *buf, size_t len, const int *fds, int nfds) {
  struct iovec iov = {(void *)buf, len};
  struct msghdr msg;
  memset(&msg, 0, sizeof msg);
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  char control[CMSG_SPACE(4 * sizeof(int))];
  if (nfds > 0) {
    if (nfds > 4) nfds = 4;
    memset(control, 0, sizeof control);
    msg.msg_control = control;
    msg.msg_controllen = CMSG_SPACE((size_t)nfds * sizeof(int));
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN((size_t)nfds * sizeof(int));
    memcpy(CMSG_DATA(c), fds, (size_t)nfds * sizeof(int));
  }
  ssize_t r;
  do { r = sendmsg(sock, &msg, MSG_NOSIGNAL); } while (r < 0 && errno == EINTR);
  return r;
}

ssize_t pmem_recv_with_fds(int sock, void *buf, size_t len, int *fds, int maxfds, int *nfds) {
  struct iovec iov = {buf, len};
  struct msghdr msg;
  memset(&msg, 0, sizeof msg);
  msg.msg_iov = &iov;
  msg.msg_iovlen = 1;
  char control[CMSG_SPACE(4 * sizeof(int))];
  msg.msg_control = control;
  msg.msg_controllen = sizeof control;
  *nfds = 0;
  ssize_t r;
  do { r = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC); } while (r < 0 && errno == EINTR);
  if (r < 0) return r;
  for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) {
      int n = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
      int *p = (int *)CMSG_DATA(c);
      for (int i = 0; i < n; i++) {
        if (*nfds < maxfds) fds[(*nfds)++] = p[i];
        else close(p[i]);
      }
    }
  }
  return r;
}

int pmem_tcp_nodelay(int fd) {
  int one = 1;
  return setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

int pmem_pipe_cloexec(int fds[2]) {
  return pipe2(fds, O_CLOEXEC);
}

int pmem_spawn_actions_closefrom(posix_spawn_file_actions_t *actions, int from) {
  return posix_spawn_file_actions_addclosefrom_np(actions, from);
}

int pmem_pidfd_open(pid_t pid) {
  return (int)syscall(SYS_pidfd_open, pid, 0);
}

int pmem_pidfd_send_signal(int pidfd, int sig) {
  return (int)syscall(SYS_pidfd_send_signal, pidfd, sig, NULL, 0);
}

int pmem_set_parent_death_signal(int sig) {
  return prctl(PR_SET_PDEATHSIG, (unsigned long)sig, 0, 0, 0);
}

void pmem_syslog(int priority, const char *message) {
  syslog(priority, "%s", message);
}
