/**
 * I/O buffers and zero checks.
 *
 * On these machines read() into memory 1–31 bytes past a page boundary is ~5× slower, and
 * Node's large Buffers (glibc mmap) start 16 bytes past a page. Starting our view 48 bytes in
 * lands on a fast offset whether the allocation begins at page+0 or page+16.
 * (shared/reference/packages-and-io.md §6.4)
 */

const IO_BUFFER_SKEW = 48;

/** An uninitialised buffer of `size` bytes placed for fast read()/write(). */
export function allocIoBuffer(size: number): Buffer {
  return Buffer.allocUnsafeSlow(size + IO_BUFFER_SKEW + 16).subarray(IO_BUFFER_SKEW, IO_BUFFER_SKEW + size);
}

const zeroBuffers = new Map<number, Buffer>();

/** A shared all-zero buffer of `size` bytes. Never write into it. */
export function zeroBuffer(size: number): Buffer {
  let buf = zeroBuffers.get(size);
  if (!buf) {
    buf = Buffer.alloc(size);
    if (zeroBuffers.size < 16) zeroBuffers.set(size, buf);
  }
  return buf;
}

/**
 * True when every byte is zero. memcmp speed: compares the bytes against themselves shifted by
 * one, which needs no zero buffer and reads the data once.
 */
export function isAllZero(bytes: Uint8Array): boolean {
  const n = bytes.length;
  if (n === 0) return true;
  if (bytes[0] !== 0) return false;
  const buf = Buffer.isBuffer(bytes) ? bytes : Buffer.from(bytes.buffer, bytes.byteOffset, n);
  return buf.compare(buf, 0, n - 1, 1, n) === 0;
}

/** A Buffer view of any Uint8Array, without copying. */
export function asBuffer(bytes: Uint8Array): Buffer {
  return Buffer.isBuffer(bytes) ? bytes : Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
}
