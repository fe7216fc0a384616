/*
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

static napi_value init(napi_env env, napi_value exports) {
  napi_property_descriptor properties[] = {
    {"nextData", NULL, next_data, NULL, NULL, NULL, napi_enumerable, NULL},
    {"nextHole", NULL, next_hole, NULL, NULL, NULL, napi_enumerable, NULL},
  };
  napi_define_properties(env, exports, sizeof properties / sizeof properties[0], properties);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
