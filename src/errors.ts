/**
 * Every failure this library reports is a {@link Qcow2StreamError} with a stable `code`.
 * Callers branch on `code` (or `instanceof` a subclass); messages are for people and may change.
 *
 * `instanceof` works across duplicate installs of the package: classes brand-check through a
 * registered symbol instead of the prototype chain.
 */

import { describeValue } from './internal/arguments.js';

const BRAND = Symbol.for('qcow2-stream.error');

/** The stable codes, one per failure class (see {@link AnyQcow2StreamError}). Documented in the README's error table. */
export type ErrorCode =
  | 'QCOW_ERR'
  | 'QCOW_ERR_INVALID_ARGUMENT'
  | 'QCOW_ERR_BAD_MAGIC'
  | 'QCOW_ERR_UNSUPPORTED_VERSION'
  | 'QCOW_ERR_UNSUPPORTED_FEATURE'
  | 'QCOW_ERR_CORRUPT_IMAGE'
  | 'QCOW_ERR_LIMIT_EXCEEDED'
  | 'QCOW_ERR_UNEXPECTED_EOF'
  | 'QCOW_ERR_PATH_POLICY'
  | 'QCOW_ERR_FILE'
  | 'QCOW_ERR_STREAM'
  | 'QCOW_ERR_INPUT_SIZE'
  | 'QCOW_ERR_NOT_SEEKABLE'
  | 'QCOW_ERR_DEDUP_UNSUPPORTED'
  | 'QCOW_ERR_UNSUPPORTED_FORMAT'
  | 'QCOW_ERR_ABORTED'
  | 'QCOW_ERR_NBD_CONNECTION'
  | 'QCOW_ERR_NBD_PROTOCOL'
  | 'QCOW_ERR_NBD_SERVER'
  | 'QCOW_ERR_COMPRESSION_UNSUPPORTED'
  | 'QCOW_ERR_OBJECT_STORAGE'
  | 'QCOW_ERR_MISSING_DEPENDENCY'
  | 'QCOW_ERR_JOB';

/** Context that errors about image structures carry as real properties. */
export interface StructureContext {
  /** The on-disk structure, e.g. `header`, `L1 table`, `L2 entry`, `refcount table`. */
  structure?: string;
  /** The field within it, e.g. `cluster_bits`. */
  field?: string;
  /** Byte offset in the file the structure was read from. */
  offset?: number;
}

export interface ErrorOptions extends StructureContext {
  /** The underlying error (an OS error, a nested failure), kept as the standard `cause`. */
  cause?: unknown;
  /** A short suggestion printed by the CLI after the message. */
  hint?: string;
}

/**
 * The base class of every error this library throws. Branch on {@link code}; the message is for
 * people and may change. Subclasses add the facts of their failure (`path`, `limit`, `expected`…).
 */
export class Qcow2StreamError extends Error {
  /** The stable code: one per subclass, `QCOW_ERR` only for this base class. Listed in the README. */
  readonly code: ErrorCode;
  /** The on-disk structure involved, e.g. `header`, `L2 entry`, when the error is about one. */
  readonly structure: string | undefined;
  /** The field of {@link structure} involved, e.g. `cluster_bits`. */
  readonly field: string | undefined;
  /** The byte offset in the file the structure was read from. */
  readonly offset: number | undefined;
  /** A short suggestion of what to do about it; the CLI prints it after the message. */
  readonly hint: string | undefined;

  constructor(message: string, options: ErrorOptions = {}, code: ErrorCode = 'QCOW_ERR') {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.name = new.target.name;
    this.code = code;
    this.structure = options.structure;
    this.field = options.field;
    this.offset = options.offset;
    this.hint = options.hint;
  }

  /** The brand that makes `instanceof` work across copies of the package. @internal */
  get [BRAND](): ErrorCode {
    return this.code;
  }

  /**
   * `instanceof` by brand: the base class matches every error of this library, a subclass the
   * errors of its own code, even when they come from another copy of the package.
   */
  static override [Symbol.hasInstance](instance: unknown): boolean {
    if (typeof instance !== 'object' || instance === null || !(BRAND in instance)) return false;
    // The base class matches every error of ours; a subclass matches its own code.
    if (this === Qcow2StreamError) return true;
    const probe = (this as { readonly CODE?: ErrorCode }).CODE;
    return probe !== undefined && (instance as Record<symbol, unknown>)[BRAND] === probe;
  }
}

/**
 * True for any error raised by this library (including from another copy of it). It narrows to
 * {@link AnyQcow2StreamError}, so `switch (err.code)` then knows each case's class:
 *
 * ```ts
 * if (isQcow2StreamError(err)) {
 *   switch (err.code) {
 *     case 'QCOW_ERR_FILE': console.error(err.path, err.systemCode, err.errno); break;
 *     case 'QCOW_ERR_INPUT_SIZE': console.error(err.expected, err.actual); break;
 *   }
 * }
 * ```
 */
export function isQcow2StreamError(value: unknown): value is AnyQcow2StreamError {
  return value instanceof Qcow2StreamError;
}

/** A caller passed an option or argument that cannot work (bad cluster size, size too large…). */
export class InvalidArgumentError extends Qcow2StreamError {
  /** The stable code of this class. */
  static readonly CODE = 'QCOW_ERR_INVALID_ARGUMENT' as const;
  /** The stable code, as a literal type: after `switch (err.code)` TypeScript knows the class. */
  declare readonly code: typeof InvalidArgumentError.CODE;
  constructor(message: string, options?: ErrorOptions) {
    super(message, options, InvalidArgumentError.CODE);
  }
}

/** The file does not start with the qcow2 magic. */
export class BadMagicError extends Qcow2StreamError {
  /** The stable code of this class. */
  static readonly CODE = 'QCOW_ERR_BAD_MAGIC' as const;
  /** The stable code, as a literal type: after `switch (err.code)` TypeScript knows the class. */
  declare readonly code: typeof BadMagicError.CODE;
  constructor(message: string, options?: ErrorOptions) {
    super(message, options, BadMagicError.CODE);
  }
}

/** A qcow2 version other than 2 or 3. */
export class UnsupportedVersionError extends Qcow2StreamError {
  /** The stable code of this class. */
  static readonly CODE = 'QCOW_ERR_UNSUPPORTED_VERSION' as const;
  /** The stable code, as a literal type: after `switch (err.code)` TypeScript knows the class. */
  declare readonly code: typeof UnsupportedVersionError.CODE;
  constructor(message: string, options?: ErrorOptions) {
    super(message, options, UnsupportedVersionError.CODE);
  }
}

/** The image uses something this library refuses: unknown incompatible bits, encryption… */
export class UnsupportedFeatureError extends Qcow2StreamError {
  /** The stable code of this class. */
  static readonly CODE = 'QCOW_ERR_UNSUPPORTED_FEATURE' as const;
  /** The stable code, as a literal type: after `switch (err.code)` TypeScript knows the class. */
  declare readonly code: typeof UnsupportedFeatureError.CODE;
  /** Human names of the features, when known. */
  readonly features: readonly string[];
  constructor(message: string, options?: ErrorOptions & { features?: readonly string[] }) {
    super(message, options, UnsupportedFeatureError.CODE);
    this.features = options?.features ?? [];
  }
}

/** A structure of the image breaks a rule of the format (misaligned, out of range, forbidden). */
export class CorruptImageError extends Qcow2StreamError {
  /** The stable code of this class. */
  static readonly CODE = 'QCOW_ERR_CORRUPT_IMAGE' as const;
  /** The stable code, as a literal type: after `switch (err.code)` TypeScript knows the class. */
  declare readonly code: typeof CorruptImageError.CODE;
  constructor(message: string, options?: ErrorOptions) {
    super(message, options, CorruptImageError.CODE);
  }
}

/** A size read from an image (or asked for) is above a documented limit. */
export class LimitExceededError extends Qcow2StreamError {
  /** The stable code of this class. */
  static readonly CODE = 'QCOW_ERR_LIMIT_EXCEEDED' as const;
  /** The stable code, as a literal type: after `switch (err.code)` TypeScript knows the class. */
  declare readonly code: typeof LimitExceededError.CODE;
  /** The limit that was exceeded, when it is a number. */
  readonly limit: number | undefined;
  /** The value found or asked for. */
  readonly actual: number | undefined;
  constructor(message: string, options?: ErrorOptions & { limit?: number; actual?: number }) {
    super(message, options, LimitExceededError.CODE);
    this.limit = options?.limit;
    this.actual = options?.actual;
  }
}

/** A file or stream ended before a structure it must hold. */
export class UnexpectedEofError extends Qcow2StreamError {
  /** The stable code of this class. */
  static readonly CODE = 'QCOW_ERR_UNEXPECTED_EOF' as const;
  /** The stable code, as a literal type: after `switch (err.code)` TypeScript knows the class. */
  declare readonly code: typeof UnexpectedEofError.CODE;
  constructor(message: string, options?: ErrorOptions) {
    super(message, options, UnexpectedEofError.CODE);
  }
}

/** A file name found inside an image (data file, backing file) was refused by the path policy. */
export class PathPolicyError extends Qcow2StreamError {
  /** The stable code of this class. */
  static readonly CODE = 'QCOW_ERR_PATH_POLICY' as const;
  /** The stable code, as a literal type: after `switch (err.code)` TypeScript knows the class. */
  declare readonly code: typeof PathPolicyError.CODE;
  /** The name as stored in the image. */
  readonly storedName: string;
  constructor(message: string, storedName: string, options?: ErrorOptions) {
    super(message, options, PathPolicyError.CODE);
    this.storedName = storedName;
  }
}

/**
 * An operating-system error on a named file; `cause` holds the original error. `systemCode` is
 * the OS error's name (`ENOENT`, what Node calls the error's `code`; ours is `QCOW_ERR_FILE`) and
 * `errno` its number as Node gives it (negative, e.g. -2), when there was an OS error.
 */
export class FileError extends Qcow2StreamError {
  /** The stable code of this class. */
  static readonly CODE = 'QCOW_ERR_FILE' as const;
  /** The stable code, as a literal type: after `switch (err.code)` TypeScript knows the class. */
  declare readonly code: typeof FileError.CODE;
  /** The file the operation was on, as named by the caller. */
  readonly path: string;
  /** The OS error's name (`ENOENT`, `ENOSPC`…: Node's `error.code`), when there is one. */
  readonly systemCode: string | undefined;
  /** The OS error's number as Node gives it (negative: -2 for ENOENT on Linux), when known. */
  readonly errno: number | undefined;
  /** The system call that failed (`open`, `write`…), when known. */
  readonly syscall: string | undefined;
  constructor(message: string, path: string, options?: ErrorOptions & SystemErrorFacts) {
    super(message, options, FileError.CODE);
    this.path = path;
    this.systemCode = options?.systemCode;
    this.errno = options?.errno;
    this.syscall = options?.syscall;
  }
}

/** What an OS error (Node's SystemError) says about itself, as {@link FileError} and {@link StreamError} keep it. */
export interface SystemErrorFacts {
  /** The OS error's name, e.g. `ENOENT` (Node's `error.code`). */
  systemCode?: string;
  /** Its negative number, e.g. -2 (Node's `error.errno`). */
  errno?: number;
  /** The failed system call (Node's `error.syscall`). */
  syscall?: string;
}

/**
 * A stream given to the library failed with its own error: the input Readable or iterable of a
 * conversion (an HTTP body cut off: `Error: aborted`, ECONNRESET), a Writable output, or a
 * pipeline that stopped one of our streams from outside. `cause` holds the original error.
 */
export class StreamError extends Qcow2StreamError {
  /** The stable code of this class. */
  static readonly CODE = 'QCOW_ERR_STREAM' as const;
  /** The stable code, as a literal type: after `switch (err.code)` TypeScript knows the class. */
  declare readonly code: typeof StreamError.CODE;
  /** Which stream failed, by its role: `input`, `data file`, `metadata file`, `image`, `raw image`… */
  readonly stream: string;
  /** The OS error's name when the stream's error carries one (`ECONNRESET`, `EPIPE`). */
  readonly systemCode: string | undefined;
  constructor(message: string, stream: string, options?: ErrorOptions & { systemCode?: string }) {
    super(message, options, StreamError.CODE);
    this.stream = stream;
    this.systemCode = options?.systemCode;
  }
}

/** The input was shorter or longer than the size the caller declared. */
export class InputSizeError extends Qcow2StreamError {
  /** The stable code of this class. */
  static readonly CODE = 'QCOW_ERR_INPUT_SIZE' as const;
  /** The stable code, as a literal type: after `switch (err.code)` TypeScript knows the class. */
  declare readonly code: typeof InputSizeError.CODE;
  /** The size the caller declared. */
  readonly expected: number;
  /** The bytes the input held (at least this many when it ran long). */
  readonly actual: number;
  constructor(message: string, expected: number, actual: number, options?: ErrorOptions) {
    super(message, options, InputSizeError.CODE);
    this.expected = expected;
    this.actual = actual;
  }
}

/** The operation needs random access to an output or input that is a pipe. */
export class NotSeekableError extends Qcow2StreamError {
  /** The stable code of this class. */
  static readonly CODE = 'QCOW_ERR_NOT_SEEKABLE' as const;
  /** The stable code, as a literal type: after `switch (err.code)` TypeScript knows the class. */
  declare readonly code: typeof NotSeekableError.CODE;
  constructor(message: string, options?: ErrorOptions) {
    super(message, options, NotSeekableError.CODE);
  }
}

/** Within-image dedup was asked for where the format cannot share clusters. */
export class DedupUnsupportedError extends Qcow2StreamError {
  /** The stable code of this class. */
  static readonly CODE = 'QCOW_ERR_DEDUP_UNSUPPORTED' as const;
  /** The stable code, as a literal type: after `switch (err.code)` TypeScript knows the class. */
  declare readonly code: typeof DedupUnsupportedError.CODE;
  constructor(message: string, options?: ErrorOptions) {
    super(message, options, DedupUnsupportedError.CODE);
  }
}

/**
 * Compressed output was asked for where it cannot be written: with an external data file (the
 * spec forbids compressed clusters there), or zstd on a Node.js whose zlib lacks it.
 */
export class CompressionUnsupportedError extends Qcow2StreamError {
  /** The stable code of this class. */
  static readonly CODE = 'QCOW_ERR_COMPRESSION_UNSUPPORTED' as const;
  /** The stable code, as a literal type: after `switch (err.code)` TypeScript knows the class. */
  declare readonly code: typeof CompressionUnsupportedError.CODE;
  /** `layout`: the image layout forbids compressed clusters; `runtime`: this Node.js cannot compress the type. */
  readonly reason: 'layout' | 'runtime';
  constructor(message: string, reason: 'layout' | 'runtime', options?: ErrorOptions) {
    super(message, options, CompressionUnsupportedError.CODE);
    this.reason = reason;
  }
}

/** The input is an image format this library recognises but does not read (vdi, qed, luks…). */
export class UnsupportedFormatError extends Qcow2StreamError {
  /** The stable code of this class. */
  static readonly CODE = 'QCOW_ERR_UNSUPPORTED_FORMAT' as const;
  /** The stable code, as a literal type: after `switch (err.code)` TypeScript knows the class. */
  declare readonly code: typeof UnsupportedFormatError.CODE;
  /** The format's name, as qemu-img calls it (`vdi`, `qed`, `parallels`…). */
  readonly format: string;
  constructor(message: string, format: string, options?: ErrorOptions) {
    super(message, options, UnsupportedFormatError.CODE);
    this.format = format;
  }
}

/** The operation was cancelled through an AbortSignal or a signal to the process. */
export class AbortedError extends Qcow2StreamError {
  /** The stable code of this class. */
  static readonly CODE = 'QCOW_ERR_ABORTED' as const;
  /** The stable code, as a literal type: after `switch (err.code)` TypeScript knows the class. */
  declare readonly code: typeof AbortedError.CODE;
  constructor(message = 'The operation was aborted', options?: ErrorOptions) {
    super(message, options, AbortedError.CODE);
  }
}

/** Facts every NBD error carries: the server's URI as the caller gave it (no credentials in it). */
export interface NbdErrorOptions extends ErrorOptions {
  /** The NBD URI of the server. */
  uri: string;
}

/** The NBD server could not be reached, went away, or stopped answering (a timeout). */
export class NbdConnectionError extends Qcow2StreamError {
  /** The stable code of this class. */
  static readonly CODE = 'QCOW_ERR_NBD_CONNECTION' as const;
  /** The stable code, as a literal type: after `switch (err.code)` TypeScript knows the class. */
  declare readonly code: typeof NbdConnectionError.CODE;
  /** The NBD URI of the server. */
  readonly uri: string;
  constructor(message: string, options: NbdErrorOptions) {
    super(message, options, NbdConnectionError.CODE);
    this.uri = options.uri;
  }
}

/** The NBD server broke the protocol: bad magic, a length or offset out of bounds, an unknown reply. */
export class NbdProtocolError extends Qcow2StreamError {
  /** The stable code of this class. */
  static readonly CODE = 'QCOW_ERR_NBD_PROTOCOL' as const;
  /** The stable code, as a literal type: after `switch (err.code)` TypeScript knows the class. */
  declare readonly code: typeof NbdProtocolError.CODE;
  /** The NBD URI of the server. */
  readonly uri: string;
  constructor(message: string, options: NbdErrorOptions) {
    super(message, options, NbdProtocolError.CODE);
    this.uri = options.uri;
  }
}

/**
 * The NBD server refused or failed a request: an unknown export, TLS required, a dirty bitmap it
 * does not publish, or an error reply to a read (`errno` holds the NBD error name, e.g. `EIO`).
 */
export class NbdServerError extends Qcow2StreamError {
  /** The stable code of this class. */
  static readonly CODE = 'QCOW_ERR_NBD_SERVER' as const;
  /** The stable code, as a literal type: after `switch (err.code)` TypeScript knows the class. */
  declare readonly code: typeof NbdServerError.CODE;
  /** The NBD URI of the server. */
  readonly uri: string;
  /** The NBD error (EIO, EINVAL…) or option reply (NBD_REP_ERR_UNKNOWN…) the server sent, when it sent one. */
  readonly errno: string | undefined;
  constructor(message: string, options: NbdErrorOptions & { errno?: string }) {
    super(message, options, NbdServerError.CODE);
    this.uri = options.uri;
    this.errno = options.errno;
  }
}

/**
 * Wraps an error thrown by `node:fs` (which carries `code` like `ENOENT`) in a {@link FileError}
 * that names what we were doing; Node refusing the path argument itself is an
 * {@link InvalidArgumentError}. Our own errors pass through unchanged.
 */
export function fileError(err: unknown, action: string, path: string): Qcow2StreamError {
  if (err instanceof Qcow2StreamError) return err;
  // Node refusing the path itself (a number, a NUL byte in it) is the caller's mistake, not the file's.
  const nodeCode = typeof err === 'object' && err !== null ? (err as { code?: unknown }).code : undefined;
  if (nodeCode === 'ERR_INVALID_ARG_TYPE' || nodeCode === 'ERR_INVALID_ARG_VALUE') {
    return new InvalidArgumentError(`Cannot ${action} ${describeValue(path)}: ${err instanceof Error ? err.message : String(err)}`, { cause: err });
  }
  const facts = systemErrorFacts(err);
  const reason = facts.systemCode ? describeSystemCode(facts.systemCode) : err instanceof Error ? err.message : String(err);
  return new FileError(`Cannot ${action} '${path}': ${reason}`, path, { cause: err, ...facts });
}

/**
 * Wraps the error of a stream that is not ours (an input Readable, a Writable output, whatever
 * stopped a pipeline around one of our streams) so that callers only ever see our errors: an
 * abort (Node's `AbortError`, a DOMException from `AbortController.abort()`) becomes an
 * {@link AbortedError}, anything else a {@link StreamError} naming the stream. Our own errors
 * pass through unchanged. `cause` keeps the original.
 */
export function streamError(err: unknown, stream: string, action = 'read'): Qcow2StreamError {
  if (err instanceof Qcow2StreamError) return err;
  if (isAbortError(err)) {
    // Node's AbortError keeps the signal's reason as its cause: when that is ours (Ctrl-C in the CLI), it is the error.
    const reason = (err as { cause?: unknown }).cause;
    return reason instanceof AbortedError ? reason : new AbortedError('The operation was aborted', { cause: err });
  }
  const { systemCode } = systemErrorFacts(err);
  const detail = err instanceof Error ? err.message : String(err);
  return new StreamError(`Cannot ${action} the ${stream} stream: ${detail}`, stream, systemCode === undefined ? { cause: err } : { cause: err, systemCode });
}

/** Node's AbortError (`ABORT_ERR`) and the DOMException an AbortSignal carries by default. */
function isAbortError(err: unknown): boolean {
  if (typeof err !== 'object' || err === null) return false;
  const { name, code } = err as { name?: unknown; code?: unknown };
  return name === 'AbortError' || code === 'ABORT_ERR';
}

/** The `code`, `errno` and `syscall` of a Node SystemError (each only when it has the right type). */
function systemErrorFacts(err: unknown): SystemErrorFacts {
  if (typeof err !== 'object' || err === null) return {};
  const { code, errno, syscall } = err as { code?: unknown; errno?: unknown; syscall?: unknown };
  return {
    ...(typeof code === 'string' && /^E[A-Z0-9]+$/.test(code) ? { systemCode: code } : {}),
    ...(typeof errno === 'number' ? { errno } : {}),
    ...(typeof syscall === 'string' ? { syscall } : {}),
  };
}

function describeSystemCode(code: string): string {
  switch (code) {
    case 'ENOENT': return 'no such file or directory';
    case 'EACCES': case 'EPERM': return 'permission denied';
    case 'EISDIR': return 'is a directory';
    case 'ENOTDIR': return 'a path component is not a directory';
    case 'ENOSPC': return 'no space left on device';
    case 'EIO': return 'input/output error';
    case 'EEXIST': return 'file already exists';
    case 'EPIPE': return 'the reader closed the pipe';
    case 'ELOOP': return 'too many levels of symbolic links';
    case 'EFBIG': return 'file too large';
    default: return code;
  }
}

/**
 * An object-storage request failed (`s3://` inputs and outputs). `reason` says what kind of
 * failure it was: `exists` (the key is taken and overwriting was not asked for), `not-found`,
 * `denied` (credentials or permissions), or `failed` (network, throttling, a 5xx: worth a retry).
 */
export class ObjectStorageError extends Qcow2StreamError {
  /** The stable code of this class. */
  static readonly CODE = 'QCOW_ERR_OBJECT_STORAGE' as const;
  /** The stable code, as a literal type: after `switch (err.code)` TypeScript knows the class. */
  declare readonly code: typeof ObjectStorageError.CODE;
  /** The object, as `s3://bucket/key`. */
  readonly uri: string;
  /** What kind of failure: `exists`, `not-found`, `denied`, or `failed` (worth a retry). */
  readonly reason: 'exists' | 'not-found' | 'denied' | 'failed';
  /** The HTTP status the store answered with, when there was an answer. */
  readonly status: number | undefined;
  constructor(message: string, uri: string, reason: ObjectStorageError['reason'], options?: ErrorOptions & { status?: number | undefined }) {
    super(message, options, ObjectStorageError.CODE);
    this.uri = uri;
    this.reason = reason;
    this.status = options?.status;
  }
}

/**
 * An optional package that a feature needs is not installed (the AWS SDK for `s3://`, BullMQ
 * and ioredis for the fleet commands): they are optional peer dependencies, so a plain
 * conversion never installs or loads them.
 */
export class MissingDependencyError extends Qcow2StreamError {
  /** The stable code of this class. */
  static readonly CODE = 'QCOW_ERR_MISSING_DEPENDENCY' as const;
  /** The stable code, as a literal type: after `switch (err.code)` TypeScript knows the class. */
  declare readonly code: typeof MissingDependencyError.CODE;
  /** The packages to install. */
  readonly packages: readonly string[];
  constructor(message: string, packages: readonly string[], options?: ErrorOptions) {
    super(message, options, MissingDependencyError.CODE);
    this.packages = packages;
  }
}

/** A fleet job could not be run as asked: a payload that is not a convert or export invocation, an unknown job id. */
export class JobError extends Qcow2StreamError {
  /** The stable code of this class. */
  static readonly CODE = 'QCOW_ERR_JOB' as const;
  /** The stable code, as a literal type: after `switch (err.code)` TypeScript knows the class. */
  declare readonly code: typeof JobError.CODE;
  constructor(message: string, options?: ErrorOptions) {
    super(message, options, JobError.CODE);
  }
}

/**
 * Every error class this library throws, as one union: {@link isQcow2StreamError} narrows to it,
 * and `switch (err.code)` then narrows each case to its class (an exhaustive switch can end in
 * a `never` check, which fails to compile when a new class is added).
 */
export type AnyQcow2StreamError =
  | InvalidArgumentError
  | BadMagicError
  | UnsupportedVersionError
  | UnsupportedFeatureError
  | CorruptImageError
  | LimitExceededError
  | UnexpectedEofError
  | PathPolicyError
  | FileError
  | StreamError
  | InputSizeError
  | NotSeekableError
  | DedupUnsupportedError
  | CompressionUnsupportedError
  | UnsupportedFormatError
  | AbortedError
  | NbdConnectionError
  | NbdProtocolError
  | NbdServerError
  | ObjectStorageError
  | MissingDependencyError
  | JobError;
