/*
 * The optional native part of qcow2-stream: an extent probe and a data mover (below).
 *
 * Extent probe: where a file's data and holes are, via lseek(SEEK_DATA / SEEK_HOLE), the call
 * qemu-img uses to skip holes. Node's fs has no lseek. Plain N-API (ABI-stable), so a build
 * made on one Node version loads on later ones.
 *
 *   nextData(fd, offset) -> the first data byte at or after offset, or the file size if none
 *   nextHole(fd, offset) -> the first hole byte at or after offset (the file size counts as a
 *                           hole), or the file size if offset is at or past it
 *
 * Both move the descriptor's file position; callers read with pread, which ignores it.
 * Other failures throw an Error whose `code` is the errno name (EINVAL where the file system
 * or file kind does not support the query).
 */

#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>
#include <node_api.h>

static napi_value throw_errno(napi_env env, int error, const char *syscall) {
  const char *code = error == EINVAL ? "EINVAL" : error == EBADF ? "EBADF" : error == ESPIPE ? "ESPIPE" : error == EOVERFLOW ? "EOVERFLOW" : "EIO";
  char message[160];
  snprintf(message, sizeof message, "%s: %s", syscall, strerror(error));
  napi_throw_error(env, code, message);
  return NULL;
}

/* Reads (fd, offset) from the call; returns 0 after throwing on bad arguments. */
static int read_arguments(napi_env env, napi_callback_info info, int32_t *fd, int64_t *offset) {
  size_t argc = 2;
  napi_value argv[2];
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 2 ||
      napi_get_value_int32(env, argv[0], fd) != napi_ok || napi_get_value_int64(env, argv[1], offset) != napi_ok || *offset < 0) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "expected (fd: number, offset: non-negative number)");
    return 0;
  }
  return 1;
}

static napi_value seek(napi_env env, napi_callback_info info, int whence, const char *name) {
  int32_t fd;
  int64_t offset;
  if (!read_arguments(env, info, &fd, &offset)) return NULL;
  off_t found = lseek(fd, (off_t)offset, whence);
  if (found < 0 && errno == ENXIO) {
    /* No data (or no hole) at or after offset: the answer is the end of the file. */
    found = lseek(fd, 0, SEEK_END);
  }
  if (found < 0) return throw_errno(env, errno, name);
  napi_value result;
  napi_create_int64(env, (int64_t)found, &result);
  return result;
}

static napi_value next_data(napi_env env, napi_callback_info info) {
  return seek(env, info, SEEK_DATA, "lseek(SEEK_DATA)");
}

static napi_value next_hole(napi_env env, napi_callback_info info) {
  return seek(env, info, SEEK_HOLE, "lseek(SEEK_HOLE)");
}

/*
 * The data mover: copyClusters(srcFd, srcOffset, dstFd, dstOffset, length, clusterSize, flags)
 * reads [srcOffset, srcOffset+length) with pread, marks each cluster that is all zeros
 * (flags[i] = 1, else 0), and writes every run of non-zero clusters to dstFd at the same
 * relative position (pwrite from dstOffset); zero clusters are not written. It runs on the
 * libuv thread pool: read, zero check and write of one chunk happen on one thread while the
 * bytes are still in its CPU cache, and two chunks in flight keep both cores busy.
 *
 * Resolves with the number of bytes read: fewer than `length` means the source ended (only the
 * clusters read are checked and written). A dstFd of -1 only reads and checks (the flags are
 * the result: the plan of a single-file image to a pipe). Rejects with an Error carrying `errno` (negative,
 * like Node's) and `syscall` ("read" or "write"), after which nothing more of the chunk is written.
 */

#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>

/* The largest chunk one call takes: each thread-pool thread keeps one buffer this big at most. */
#define MAX_COPY_BYTES (16 * 1024 * 1024)

typedef struct {
  napi_async_work work;
  napi_deferred deferred;
  napi_ref flags_ref;
  uint8_t *flags;
  int32_t src_fd, dst_fd;
  int64_t src_offset, dst_offset, length, cluster_size;
  int64_t bytes_read;
  int error;
  const char *syscall;
} copy_job;

/*
 * Writes to one file take turns here. The kernel serializes them anyway (the inode lock), but a
 * writer waiting for that lock spins on a CPU (perf: rwsem_spin_on_owner) that the other
 * copy's read and zero check could use; waiting on this mutex sleeps. Striped by descriptor.
 */
#define WRITE_LOCKS 16
static pthread_mutex_t write_locks[WRITE_LOCKS] = {
  PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER,
  PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER,
  PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER,
  PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER, PTHREAD_MUTEX_INITIALIZER,
};

/* One page-aligned buffer per thread-pool thread, reused by every chunk that thread copies. */
static __thread uint8_t *thread_buffer;
static __thread size_t thread_buffer_size;

static uint8_t *buffer_for(size_t size) {
  if (thread_buffer_size >= size) return thread_buffer;
  free(thread_buffer);
  thread_buffer = NULL;
  thread_buffer_size = 0;
  void *memory;
  if (posix_memalign(&memory, 4096, size) != 0) return NULL;
  thread_buffer = memory;
  thread_buffer_size = size;
  return thread_buffer;
}

/* All zero? 64 bytes per step (vectorized by the compiler), leaving at the first non-zero block. */
static int all_zero(const uint8_t *p, size_t n) {
  size_t i = 0;
  for (; i + 64 <= n; i += 64) {
    uint64_t w[8];
    memcpy(w, p + i, 64);
    if ((w[0] | w[1] | w[2] | w[3] | w[4] | w[5] | w[6] | w[7]) != 0) return 0;
  }
  for (; i < n; i++) {
    if (p[i]) return 0;
  }
  return 1;
}

static int write_all(int fd, const uint8_t *p, size_t n, int64_t offset) {
  while (n > 0) {
    ssize_t w = pwrite(fd, p, n, (off_t)offset);
    if (w < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    if (w == 0) return EIO;
    p += w;
    n -= (size_t)w;
    offset += w;
  }
  return 0;
}

/*
 * Reads, checks and writes the chunk piece by piece: each piece's bytes are still in the CPU
 * cache when they are checked and written, and the thread's buffer stays small.
 */
#define PIECE_BYTES (2 * 1024 * 1024)

static void copy_execute(napi_env env, void *data) {
  (void)env;
  copy_job *job = data;
  const int64_t cs = job->cluster_size;
  const int64_t piece = cs > PIECE_BYTES ? cs : PIECE_BYTES;
  uint8_t *buffer = buffer_for((size_t)(job->length < piece ? job->length : piece));
  if (!buffer) {
    job->error = ENOMEM;
    job->syscall = "read";
    return;
  }
  pthread_mutex_t *lock = &write_locks[(unsigned)job->dst_fd % WRITE_LOCKS];
  for (int64_t base = 0; base < job->length; base += piece) {
    const int64_t want = job->length - base < piece ? job->length - base : piece;
    int64_t done = 0;
    while (done < want) {
      ssize_t r = pread(job->src_fd, buffer + done, (size_t)(want - done), (off_t)(job->src_offset + base + done));
      if (r < 0) {
        if (errno == EINTR) continue;
        job->error = errno;
        job->syscall = "read";
        return;
      }
      if (r == 0) break;
      done += r;
    }
    job->bytes_read = base + done;
    uint8_t *flags = job->flags + base / cs;
    const int64_t clusters = (done + cs - 1) / cs;
    int any_data = 0;
    for (int64_t i = 0; i < clusters; i++) {
      const int64_t at = i * cs;
      flags[i] = (uint8_t)all_zero(buffer + at, (size_t)(done - at < cs ? done - at : cs));
      any_data |= !flags[i];
    }
    if (any_data && job->dst_fd >= 0) {
      pthread_mutex_lock(lock);
      for (int64_t i = 0; i < clusters && !job->error;) {
        if (flags[i]) {
          i++;
          continue;
        }
        const int64_t first = i;
        while (i < clusters && !flags[i]) i++;
        const int64_t start = first * cs;
        const int64_t end = i * cs < done ? i * cs : done;
        const int error = write_all(job->dst_fd, buffer + start, (size_t)(end - start), job->dst_offset + base + start);
        if (error) {
          job->error = error;
          job->syscall = "write";
        }
      }
      pthread_mutex_unlock(lock);
      if (job->error) return;
    }
    if (done < want) return; /* the source ended */
  }
}

static void copy_complete(napi_env env, napi_status status, void *data) {
  copy_job *job = data;
  napi_value result;
  if (status != napi_ok && job->error == 0) job->error = ECANCELED;
  if (job->error) {
    char message[160];
    snprintf(message, sizeof message, "%s: %s", job->syscall ? job->syscall : "copy", strerror(job->error));
    napi_value text, errno_value, syscall_value;
    napi_create_string_utf8(env, message, NAPI_AUTO_LENGTH, &text);
    napi_create_error(env, NULL, text, &result);
    napi_create_int32(env, -job->error, &errno_value);
    napi_set_named_property(env, result, "errno", errno_value);
    napi_create_string_utf8(env, job->syscall ? job->syscall : "copy", NAPI_AUTO_LENGTH, &syscall_value);
    napi_set_named_property(env, result, "syscall", syscall_value);
    napi_reject_deferred(env, job->deferred, result);
  } else {
    napi_create_int64(env, job->bytes_read, &result);
    napi_resolve_deferred(env, job->deferred, result);
  }
  napi_delete_reference(env, job->flags_ref);
  napi_delete_async_work(env, job->work);
  free(job);
}

static napi_value copy_clusters(napi_env env, napi_callback_info info) {
  size_t argc = 7;
  napi_value argv[7];
  int32_t src_fd, dst_fd;
  int64_t src_offset, dst_offset, length, cluster_size;
  napi_typedarray_type type;
  size_t flag_count;
  void *flags;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 7 ||
      napi_get_value_int32(env, argv[0], &src_fd) != napi_ok || napi_get_value_int64(env, argv[1], &src_offset) != napi_ok ||
      napi_get_value_int32(env, argv[2], &dst_fd) != napi_ok || napi_get_value_int64(env, argv[3], &dst_offset) != napi_ok ||
      napi_get_value_int64(env, argv[4], &length) != napi_ok || napi_get_value_int64(env, argv[5], &cluster_size) != napi_ok ||
      napi_get_typedarray_info(env, argv[6], &type, &flag_count, &flags, NULL, NULL) != napi_ok || type != napi_uint8_array) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE",
                          "expected (srcFd, srcOffset, dstFd, dstOffset, length, clusterSize: numbers, flags: Uint8Array)");
    return NULL;
  }
  if (src_offset < 0 || dst_offset < 0 || length <= 0 || length > MAX_COPY_BYTES || cluster_size < 512 ||
      (cluster_size & (cluster_size - 1)) != 0 || (int64_t)flag_count < (length + cluster_size - 1) / cluster_size) {
    napi_throw_range_error(env, "ERR_OUT_OF_RANGE",
                           "copyClusters: offsets must be >= 0, length 1..16 MiB, clusterSize a power of two >= 512, flags one byte per cluster");
    return NULL;
  }
  copy_job *job = calloc(1, sizeof *job);
  if (!job) {
    napi_throw_error(env, "ENOMEM", "copyClusters: out of memory");
    return NULL;
  }
  job->src_fd = src_fd;
  job->dst_fd = dst_fd;
  job->src_offset = src_offset;
  job->dst_offset = dst_offset;
  job->length = length;
  job->cluster_size = cluster_size;
  job->flags = flags;
  napi_value promise, name;
  napi_create_reference(env, argv[6], 1, &job->flags_ref);
  napi_create_promise(env, &job->deferred, &promise);
  napi_create_string_utf8(env, "qcow2-stream:copyClusters", NAPI_AUTO_LENGTH, &name);
  napi_create_async_work(env, NULL, name, copy_execute, copy_complete, job, &job->work);
  napi_queue_async_work(env, job->work);
  return promise;
}

/*
 * Pipe I/O: full-buffer reads from and writes to pipes, FIFOs and sockets on the thread pool,
 * cancellable. A read or write blocked on a quiet pipe is a thread-pool thread the process
 * cannot get back (and cannot exit past), so the thread never blocks in read()/write(): it
 * waits in poll() on the descriptor and on an eventfd, the canceller, which signalCanceller()
 * makes readable from the main thread. A cancelled call rejects with ECANCELED.
 *
 *   createCanceller() -> an eventfd (non-blocking, close-on-exec); close it with fs.closeSync
 *   signalCanceller(efd) -> wakes every call waiting with that canceller, now and later
 *   setPipeSize(fd, bytes) -> F_SETPIPE_SZ, halving the request until the kernel takes it
 *                             (an unprivileged process may go up to /proc/sys/fs/pipe-max-size);
 *                             the pipe's size afterwards, or 0 when fd is not a pipe
 *   readFull(fd, buffer, offset, length, efd) -> Promise<bytes read>: fewer than length only
 *                             at the end of the input
 *   writeFull(fd, buffer, offset, length, efd) -> Promise<bytes written> (all of them); EPIPE
 *                             once the reader has gone
 *   spliceFile(srcFd, srcOffset, pipeFd, length, efd) -> Promise<bytes moved>: splice(2) from a
 *                             file into a pipe, the page cache's pages handed over without a
 *                             copy; fewer than length only where the file ends. EINVAL where
 *                             the file system cannot splice (the caller then copies).
 * Errors carry a negative `errno` and `syscall`, like copyClusters'.
 */

#ifdef __linux__
#include <fcntl.h>
#include <poll.h>
#include <sys/eventfd.h>

typedef struct {
  napi_async_work work;
  napi_deferred deferred;
  napi_ref buffer_ref;
  uint8_t *data;
  int32_t fd, efd;
  int64_t length, done;
  int writing;
  /* Splicing: the file read from (the pipe is fd), and where in it. */
  int splicing;
  int32_t src_fd;
  int64_t src_offset;
  int error;
  const char *syscall;
} pipe_job;

/* Waits until fd is ready for `events` or the canceller fires; 0, or the errno to fail with. */
static int wait_ready(int fd, int efd, short events) {
  for (;;) {
    struct pollfd fds[2] = {{fd, events, 0}, {efd, POLLIN, 0}};
    int n = poll(fds, 2, -1);
    if (n < 0) {
      if (errno == EINTR) continue;
      return errno;
    }
    if (fds[1].revents) return ECANCELED;
    if (fds[0].revents & POLLNVAL) return EBADF;
    /* POLLHUP/POLLERR: let read() see the end of the input, and write() its EPIPE. */
    if (fds[0].revents) return 0;
  }
}

static void pipe_execute(napi_env env, void *data) {
  (void)env;
  pipe_job *job = data;
  while (job->done < job->length) {
    int error = wait_ready(job->fd, job->efd, job->writing ? POLLOUT : POLLIN);
    if (error) {
      job->error = error;
      job->syscall = "poll";
      return;
    }
    size_t want = (size_t)(job->length - job->done);
    ssize_t n;
    if (job->splicing) {
      loff_t from = (loff_t)(job->src_offset + job->done);
      /* Non-blocking on the pipe side only: a full pipe is EAGAIN, and we wait in poll() again. */
      n = splice(job->src_fd, &from, job->fd, NULL, want, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
    } else {
      n = job->writing ? write(job->fd, job->data + job->done, want) : read(job->fd, job->data + job->done, want);
    }
    if (n < 0) {
      if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK) continue;
      job->error = errno;
      job->syscall = job->splicing ? "splice" : job->writing ? "write" : "read";
      return;
    }
    if (n == 0) {
      if (job->writing && !job->splicing) {
        job->error = EIO;
        job->syscall = "write";
      }
      return; /* the end of the input */
    }
    job->done += n;
  }
}

static void pipe_complete(napi_env env, napi_status status, void *data) {
  pipe_job *job = data;
  napi_value result;
  if (status != napi_ok && job->error == 0) job->error = ECANCELED;
  if (job->error) {
    char message[160];
    snprintf(message, sizeof message, "%s: %s", job->syscall, strerror(job->error));
    napi_value text, errno_value, syscall_value;
    napi_create_string_utf8(env, message, NAPI_AUTO_LENGTH, &text);
    napi_create_error(env, NULL, text, &result);
    napi_create_int32(env, -job->error, &errno_value);
    napi_set_named_property(env, result, "errno", errno_value);
    napi_create_string_utf8(env, job->syscall, NAPI_AUTO_LENGTH, &syscall_value);
    napi_set_named_property(env, result, "syscall", syscall_value);
    napi_reject_deferred(env, job->deferred, result);
  } else {
    napi_create_int64(env, job->done, &result);
    napi_resolve_deferred(env, job->deferred, result);
  }
  if (job->buffer_ref) napi_delete_reference(env, job->buffer_ref);
  napi_delete_async_work(env, job->work);
  free(job);
}

static napi_value pipe_io(napi_env env, napi_callback_info info, int writing) {
  size_t argc = 5;
  napi_value argv[5];
  int32_t fd, efd;
  int64_t offset, length;
  napi_typedarray_type type;
  size_t size;
  void *bytes;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 5 || napi_get_value_int32(env, argv[0], &fd) != napi_ok ||
      napi_get_typedarray_info(env, argv[1], &type, &size, &bytes, NULL, NULL) != napi_ok || type != napi_uint8_array ||
      napi_get_value_int64(env, argv[2], &offset) != napi_ok || napi_get_value_int64(env, argv[3], &length) != napi_ok ||
      napi_get_value_int32(env, argv[4], &efd) != napi_ok) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "expected (fd: number, buffer: Uint8Array, offset: number, length: number, canceller: number)");
    return NULL;
  }
  if (offset < 0 || length < 0 || (uint64_t)(offset + length) > size) {
    napi_throw_range_error(env, "ERR_OUT_OF_RANGE", "pipe I/O: [offset, offset + length) must lie inside the buffer");
    return NULL;
  }
  pipe_job *job = calloc(1, sizeof *job);
  if (!job) {
    napi_throw_error(env, "ENOMEM", "pipe I/O: out of memory");
    return NULL;
  }
  job->fd = fd;
  job->efd = efd;
  job->data = (uint8_t *)bytes + offset;
  job->length = length;
  job->writing = writing;
  napi_value promise, name;
  napi_create_reference(env, argv[1], 1, &job->buffer_ref);
  napi_create_promise(env, &job->deferred, &promise);
  napi_create_string_utf8(env, writing ? "qcow2-stream:writeFull" : "qcow2-stream:readFull", NAPI_AUTO_LENGTH, &name);
  napi_create_async_work(env, NULL, name, pipe_execute, pipe_complete, job, &job->work);
  napi_queue_async_work(env, job->work);
  return promise;
}

static napi_value splice_file(napi_env env, napi_callback_info info) {
  size_t argc = 5;
  napi_value argv[5];
  int32_t src_fd, fd, efd;
  int64_t src_offset, length;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 5 || napi_get_value_int32(env, argv[0], &src_fd) != napi_ok ||
      napi_get_value_int64(env, argv[1], &src_offset) != napi_ok || napi_get_value_int32(env, argv[2], &fd) != napi_ok ||
      napi_get_value_int64(env, argv[3], &length) != napi_ok || napi_get_value_int32(env, argv[4], &efd) != napi_ok || src_offset < 0 || length < 0) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "expected (srcFd: number, srcOffset: non-negative number, pipeFd: number, length: non-negative number, canceller: number)");
    return NULL;
  }
  pipe_job *job = calloc(1, sizeof *job);
  if (!job) {
    napi_throw_error(env, "ENOMEM", "spliceFile: out of memory");
    return NULL;
  }
  job->fd = fd;
  job->efd = efd;
  job->length = length;
  job->writing = 1;
  job->splicing = 1;
  job->src_fd = src_fd;
  job->src_offset = src_offset;
  napi_value promise, name;
  napi_create_promise(env, &job->deferred, &promise);
  napi_create_string_utf8(env, "qcow2-stream:spliceFile", NAPI_AUTO_LENGTH, &name);
  napi_create_async_work(env, NULL, name, pipe_execute, pipe_complete, job, &job->work);
  napi_queue_async_work(env, job->work);
  return promise;
}

static napi_value read_full(napi_env env, napi_callback_info info) {
  return pipe_io(env, info, 0);
}

static napi_value write_full(napi_env env, napi_callback_info info) {
  return pipe_io(env, info, 1);
}

static napi_value create_canceller(napi_env env, napi_callback_info info) {
  (void)info;
  int efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (efd < 0) return throw_errno(env, errno, "eventfd");
  napi_value result;
  napi_create_int32(env, efd, &result);
  return result;
}

static napi_value signal_canceller(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  int32_t efd;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 1 || napi_get_value_int32(env, argv[0], &efd) != napi_ok) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "expected (canceller: number)");
    return NULL;
  }
  /* The counter stays non-zero (nobody reads it), so every later poll sees it too. */
  uint64_t one = 1;
  if (write(efd, &one, sizeof one) < 0 && errno != EAGAIN) return throw_errno(env, errno, "write(eventfd)");
  return NULL;
}

static napi_value set_pipe_size(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  int32_t fd;
  int64_t want;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 2 || napi_get_value_int32(env, argv[0], &fd) != napi_ok ||
      napi_get_value_int64(env, argv[1], &want) != napi_ok) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "expected (fd: number, bytes: number)");
    return NULL;
  }
  int size = fcntl(fd, F_GETPIPE_SZ);
  if (size >= 0) {
    for (int64_t ask = want; ask > size; ask /= 2) {
      int got = fcntl(fd, F_SETPIPE_SZ, (int)ask);
      if (got >= 0) {
        size = got;
        break;
      }
      if (errno != EPERM && errno != EBUSY && errno != EINVAL) break;
    }
  }
  napi_value result;
  napi_create_int32(env, size < 0 ? 0 : size, &result);
  return result;
}
#endif

/*
 * xxh64(bytes: Uint8Array) -> bigint: XXH64 with seed 0, the fingerprint of dedup and manifests,
 * on the calling thread (a 64 KiB cluster takes a few microseconds: a thread-pool round trip
 * would cost more). The same values as xxhash-wasm's h64Raw, without copying the bytes into
 * wasm memory first.
 */
#define XXH_P1 0x9E3779B185EBCA87ULL
#define XXH_P2 0xC2B2AE3D27D4EB4FULL
#define XXH_P3 0x165667B19E3779F9ULL
#define XXH_P4 0x85EBCA77C2B2AE63ULL
#define XXH_P5 0x27D4EB2F165667C5ULL

static inline uint64_t xxh_rotl(uint64_t x, int r) {
  return (x << r) | (x >> (64 - r));
}

static inline uint64_t xxh_read64(const uint8_t *p) {
  uint64_t v;
  memcpy(&v, p, 8);
  return v; /* little-endian hosts (x86-64, arm64) */
}

static inline uint32_t xxh_read32(const uint8_t *p) {
  uint32_t v;
  memcpy(&v, p, 4);
  return v;
}

static inline uint64_t xxh_round(uint64_t acc, uint64_t input) {
  acc += input * XXH_P2;
  acc = xxh_rotl(acc, 31);
  return acc * XXH_P1;
}

static inline uint64_t xxh_merge(uint64_t acc, uint64_t val) {
  acc ^= xxh_round(0, val);
  return acc * XXH_P1 + XXH_P4;
}

static uint64_t xxh64(const uint8_t *p, size_t len, uint64_t seed) {
  const uint8_t *const end = p + len;
  uint64_t h;
  if (len >= 32) {
    uint64_t v1 = seed + XXH_P1 + XXH_P2, v2 = seed + XXH_P2, v3 = seed, v4 = seed - XXH_P1;
    const uint8_t *const limit = end - 32;
    do {
      v1 = xxh_round(v1, xxh_read64(p));
      v2 = xxh_round(v2, xxh_read64(p + 8));
      v3 = xxh_round(v3, xxh_read64(p + 16));
      v4 = xxh_round(v4, xxh_read64(p + 24));
      p += 32;
    } while (p <= limit);
    h = xxh_rotl(v1, 1) + xxh_rotl(v2, 7) + xxh_rotl(v3, 12) + xxh_rotl(v4, 18);
    h = xxh_merge(h, v1);
    h = xxh_merge(h, v2);
    h = xxh_merge(h, v3);
    h = xxh_merge(h, v4);
  } else {
    h = seed + XXH_P5;
  }
  h += (uint64_t)len;
  while (p + 8 <= end) {
    h ^= xxh_round(0, xxh_read64(p));
    h = xxh_rotl(h, 27) * XXH_P1 + XXH_P4;
    p += 8;
  }
  if (p + 4 <= end) {
    h ^= (uint64_t)xxh_read32(p) * XXH_P1;
    h = xxh_rotl(h, 23) * XXH_P2 + XXH_P3;
    p += 4;
  }
  while (p < end) {
    h ^= (*p) * XXH_P5;
    h = xxh_rotl(h, 11) * XXH_P1;
    p++;
  }
  h ^= h >> 33;
  h *= XXH_P2;
  h ^= h >> 29;
  h *= XXH_P3;
  h ^= h >> 32;
  return h;
}

static napi_value xxh64_call(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  napi_typedarray_type type;
  size_t length;
  void *bytes;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 1 ||
      napi_get_typedarray_info(env, argv[0], &type, &length, &bytes, NULL, NULL) != napi_ok || type != napi_uint8_array) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "expected (bytes: Uint8Array)");
    return NULL;
  }
  napi_value result;
  napi_create_bigint_uint64(env, xxh64(bytes, length, 0), &result);
  return result;
}

static napi_value init(napi_env env, napi_value exports) {
  napi_property_descriptor properties[] = {
    {"nextData", NULL, next_data, NULL, NULL, NULL, napi_default_jsproperty, NULL},
    {"nextHole", NULL, next_hole, NULL, NULL, NULL, napi_default_jsproperty, NULL},
    {"copyClusters", NULL, copy_clusters, NULL, NULL, NULL, napi_default_jsproperty, NULL},
    {"xxh64", NULL, xxh64_call, NULL, NULL, NULL, napi_default_jsproperty, NULL},
#ifdef __linux__
    {"readFull", NULL, read_full, NULL, NULL, NULL, napi_default_jsproperty, NULL},
    {"writeFull", NULL, write_full, NULL, NULL, NULL, napi_default_jsproperty, NULL},
    {"createCanceller", NULL, create_canceller, NULL, NULL, NULL, napi_default_jsproperty, NULL},
    {"signalCanceller", NULL, signal_canceller, NULL, NULL, NULL, napi_default_jsproperty, NULL},
    {"setPipeSize", NULL, set_pipe_size, NULL, NULL, NULL, napi_default_jsproperty, NULL},
    {"spliceFile", NULL, splice_file, NULL, NULL, NULL, napi_default_jsproperty, NULL},
#endif
  };
  napi_define_properties(env, exports, sizeof properties / sizeof properties[0], properties);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
