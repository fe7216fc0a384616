/**
 * Objects as inputs and outputs (`s3://bucket/key`), over `@aws-sdk/client-s3`.
 *
 * The SDK is an optional peer dependency, loaded here on first use with a plain `require` (not
 * bundled into the CLI, not loaded by a conversion of files). Endpoint, region and credentials
 * come from the SDK's standard chain (environment, shared config and credentials files, …);
 * `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT_URL_S3`) points it at an S3-compatible store, which then
 * gets path-style requests (`QCOW2_STREAM_S3_PATH_STYLE=0` turns that off, `=1` forces it).
 *
 * Output: {@link S3UploadSink}, a multipart upload written in order (the sequential side of
 * OffsetWriter). Parts are our own copies of the bytes, so callers may recycle their buffers
 * as soon as a write resolves; memory is at most `queueSize + 1` parts. Nothing appears under
 * the key before commit (CompleteMultipartUpload, or one PutObject for a small object); abort
 * sends AbortMultipartUpload and waits for it. Without overwrite, a HEAD before the upload
 * refuses an existing key on any store, and the completing request carries `If-None-Match: *`,
 * which S3 enforces atomically (a key taken meanwhile fails with 412); stores that ignore the
 * header (s3rver does) get only the HEAD check.
 *
 * Why not lib-storage's `Upload`: it completes when its body ends and its abort() rejects done()
 * at once, before AbortMultipartUpload has been sent — a caller cannot wait until nothing
 * partial is left. The bench compares against it (bench/s3.ts).
 *
 * Input: {@link getObjectRange}, one ranged GET pinned to the ETag seen by the first HEAD (so an
 * object replaced mid-read fails instead of mixing two versions) with bounded retries; on it,
 * {@link readObject} (raw bytes in order, two GETs in flight, convert's raw input) and the
 * readers' object source (src/read/object-source.ts: any image format, random access).
 */

import { createRequire } from 'node:module';
import type * as S3Sdk from '@aws-sdk/client-s3';
import { AbortedError, MissingDependencyError, ObjectStorageError } from '../errors.js';
import { parseS3Uri, type S3Location } from './s3-uri.js';

type Sdk = typeof S3Sdk;

/** S3 allows at most 10,000 parts; every part but the last is at least 5 MiB. */
export const MAX_PARTS = 10_000;
const MIN_PART = 8 * 1024 * 1024;
/** Part size when the final size is not known: 10,000 of them cover 156 GiB. */
const UNKNOWN_SIZE_PART = 16 * 1024 * 1024;
/** Bytes of parts in flight per upload, above which fewer parts are sent at once. */
const INFLIGHT_BUDGET = 64 * 1024 * 1024;
/** Ranged GET size for reads. */
export const READ_CHUNK = 8 * 1024 * 1024;

let sdk: Sdk | undefined;
let client: S3Sdk.S3Client | undefined;

/** The AWS SDK, loaded on first use; a MissingDependencyError names the packages to install. */
export function loadS3Sdk(): Sdk {
  if (sdk) return sdk;
  try {
    // A runtime require, so neither tsc's ESM output nor the CLI bundle pulls the SDK in.
    sdk = createRequire(import.meta.url)('@aws-sdk/client-s3') as Sdk;
  } catch (err) {
    throw new MissingDependencyError("s3:// needs the AWS SDK, which is not installed", ['@aws-sdk/client-s3'], {
      cause: err,
      hint: 'npm install @aws-sdk/client-s3 (next to qcow2-stream)',
    });
  }
  return sdk;
}

/** The process's S3 client, configured from the SDK's standard chain. */
export function s3Client(): S3Sdk.S3Client {
  if (client) return client;
  const { S3Client } = loadS3Sdk();
  const env = process.env;
  const custom = Boolean(env['AWS_ENDPOINT_URL_S3'] || env['AWS_ENDPOINT_URL']);
  const flag = env['QCOW2_STREAM_S3_PATH_STYLE'];
  const forcePathStyle = flag === undefined ? custom : flag === '1';
  client = new S3Client({ forcePathStyle });
  return client;
}

/** Replaces the client (tests: a mock, or another endpoint); undefined goes back to the default. */
export function setS3Client(next: S3Sdk.S3Client | undefined): void {
  client = next;
}

/** Part size for an object of `size` bytes (unknown: 16 MiB): whole MiB, ≥ 8 MiB, ≤ 10,000 parts. */
export function partSizeFor(size: number | undefined): number {
  if (size === undefined) return UNKNOWN_SIZE_PART;
  const mib = 1024 * 1024;
  return Math.max(MIN_PART, Math.ceil(size / MAX_PARTS / mib) * mib);
}

/** Turns an SDK failure into an ObjectStorageError; credentials never appear in it (the SDK's messages hold none). */
export function storageError(err: unknown, action: string, uri: string): ObjectStorageError | AbortedError {
  if (err instanceof ObjectStorageError || err instanceof AbortedError) return err;
  const e = err as { name?: string; message?: string; $metadata?: { httpStatusCode?: number } };
  if (e?.name === 'AbortError') return new AbortedError(`Cancelled while trying to ${action} '${uri}'`, { cause: err });
  const status = e?.$metadata?.httpStatusCode;
  const name = e?.name ?? 'Error';
  let reason: ObjectStorageError['reason'] = 'failed';
  if (status === 404 || name === 'NoSuchKey' || name === 'NotFound' || name === 'NoSuchBucket') reason = 'not-found';
  else if (status === 412 || name === 'PreconditionFailed') reason = 'exists';
  else if (status === 403 || /AccessDenied|InvalidAccessKeyId|SignatureDoesNotMatch|CredentialsProviderError/.test(name)) reason = 'denied';
  const hints: Record<ObjectStorageError['reason'], string> = {
    exists: 'Replace it with --force (API: overwrite: true)',
    'not-found': 'Check the bucket and key',
    denied: 'Check the credentials (AWS_PROFILE, AWS_ACCESS_KEY_ID…) and the bucket policy',
    failed: 'Check AWS_ENDPOINT_URL and AWS_REGION; the run can be retried',
  };
  const detail = e?.message && e.message !== name ? `${name}: ${e.message}` : name;
  return new ObjectStorageError(`Cannot ${action} '${uri}': ${detail}${status ? ` (HTTP ${status})` : ''}`, uri, reason, {
    cause: err,
    status,
    hint: hints[reason],
  });
}

/** HEAD of an object: its size and ETag, or undefined when there is none. */
export async function headObject(uri: string, signal?: AbortSignal): Promise<{ size: number; etag: string | undefined } | undefined> {
  const { bucket, key } = parseS3Uri(uri);
  const { HeadObjectCommand } = loadS3Sdk();
  try {
    const head = await s3Client().send(new HeadObjectCommand({ Bucket: bucket, Key: key }), signal ? { abortSignal: signal } : {});
    return { size: head.ContentLength ?? 0, etag: head.ETag };
  } catch (err) {
    const failure = storageError(err, 'inspect', uri);
    if (failure instanceof ObjectStorageError && failure.reason === 'not-found') return undefined;
    throw failure;
  }
}

/** Deletes an object (a committed output of a run that failed later). */
export async function deleteObject(uri: string): Promise<void> {
  const { bucket, key } = parseS3Uri(uri);
  const { DeleteObjectCommand } = loadS3Sdk();
  try {
    await s3Client().send(new DeleteObjectCommand({ Bucket: bucket, Key: key }));
  } catch (err) {
    throw storageError(err, 'delete', uri);
  }
}

/** Options of {@link S3UploadSink.open}. */
export interface S3UploadOptions {
  /** Replace an existing object. Default false. */
  overwrite?: boolean;
  /** The object's final size when known: picks the part size so 10,000 parts suffice. */
  sizeHint?: number | undefined;
  /** Part size override (≥ 5 MiB). */
  partSize?: number;
  /** Parts uploaded at once (default: 4, fewer for parts above 16 MiB). */
  queueSize?: number;
}

/**
 * An object written in order: `write` copies into the current part and uploads full parts in
 * the background, `close` completes the object, `abort` removes every trace of it.
 */
export class S3UploadSink {
  /** Bytes taken so far. */
  bytes = 0;
  private part: Buffer | undefined;
  private partFill = 0;
  private partNumber = 0;
  private uploadId: string | undefined;
  private readonly parts: S3Sdk.CompletedPart[] = [];
  private readonly inflight = new Set<Promise<void>>();
  private failure: unknown;
  private readonly controller = new AbortController();
  private state: 'open' | 'closed' | 'aborted' = 'open';
  private checksums = false;

  private constructor(
    readonly uri: string,
    private readonly location: S3Location,
    private readonly sdk: Sdk,
    private readonly client: S3Sdk.S3Client,
    readonly partSize: number,
    private readonly queueSize: number,
    private readonly overwrite: boolean,
  ) {}

  /** Checks the key (unless overwriting) and prepares the upload; nothing is sent to the key yet. */
  static async open(uri: string, options: S3UploadOptions = {}): Promise<S3UploadSink> {
    const location = parseS3Uri(uri);
    const sdk = loadS3Sdk();
    const overwrite = options.overwrite ?? false;
    if (!overwrite && (await headObject(uri)) !== undefined) {
      throw new ObjectStorageError(`The object '${uri}' already exists`, uri, 'exists', { hint: 'Remove it first, or replace it with --force (API: overwrite: true)' });
    }
    const partSize = options.partSize ?? partSizeFor(options.sizeHint);
    const queueSize = options.queueSize ?? Math.max(1, Math.min(4, Math.floor(INFLIGHT_BUDGET / partSize)));
    const sink = new S3UploadSink(uri, location, sdk, s3Client(), partSize, queueSize, overwrite);
    // Mirror the SDK's default integrity setting: CRC32 per part when it checksums requests.
    sink.checksums = (await sink.client.config.requestChecksumCalculation()) === 'WHEN_SUPPORTED';
    return sink;
  }

  async write(chunk: Uint8Array): Promise<void> {
    if (this.state !== 'open') throw new Error(`unreachable: write to a ${this.state} upload of ${this.uri}`);
    this.throwIfFailed();
    let at = 0;
    while (at < chunk.length) {
      this.part ??= Buffer.allocUnsafe(this.partSize);
      const n = Math.min(chunk.length - at, this.partSize - this.partFill);
      this.part.set(chunk.subarray(at, at + n), this.partFill);
      this.partFill += n;
      at += n;
      if (this.partFill === this.partSize) await this.sendPart();
    }
    this.bytes += chunk.length;
  }

  /** Uploads what is left and completes the object: only now does it appear under the key. */
  async close(): Promise<void> {
    if (this.state !== 'open') return;
    try {
      if (this.uploadId === undefined) {
        // Smaller than one part: a single PutObject, conditional like the completion.
        const { PutObjectCommand } = this.sdk;
        const body = this.part ? this.part.subarray(0, this.partFill) : Buffer.alloc(0);
        await this.client.send(
          new PutObjectCommand({ Bucket: this.location.bucket, Key: this.location.key, Body: body, ContentLength: body.length, ...this.condition() }),
          { abortSignal: this.controller.signal },
        );
      } else {
        if (this.partFill > 0) await this.sendPart();
        await Promise.allSettled([...this.inflight]);
        this.throwIfFailed();
        const { CompleteMultipartUploadCommand } = this.sdk;
        this.parts.sort((a, b) => a.PartNumber! - b.PartNumber!);
        await this.client.send(
          new CompleteMultipartUploadCommand({
            Bucket: this.location.bucket,
            Key: this.location.key,
            UploadId: this.uploadId,
            MultipartUpload: { Parts: this.parts },
            ...this.condition(),
          }),
          { abortSignal: this.controller.signal },
        );
      }
      this.state = 'closed';
      this.part = undefined;
    } catch (err) {
      await this.abort();
      throw storageError(err, 'finish the upload of', this.uri);
    }
  }

  /** Cancels the parts in flight and aborts the multipart upload, waiting until the store has dropped it. Never throws. */
  async abort(): Promise<void> {
    if (this.state !== 'open') return;
    this.state = 'aborted';
    this.part = undefined;
    this.controller.abort();
    await Promise.allSettled([...this.inflight]);
    if (this.uploadId === undefined) return;
    const { AbortMultipartUploadCommand } = this.sdk;
    // Its own request, not under the aborted signal; a store that lost it already is fine too.
    await this.client
      .send(new AbortMultipartUploadCommand({ Bucket: this.location.bucket, Key: this.location.key, UploadId: this.uploadId }))
      .catch(() => {});
  }

  private condition(): { IfNoneMatch?: string } {
    return this.overwrite ? {} : { IfNoneMatch: '*' };
  }

  private throwIfFailed(): void {
    if (this.failure !== undefined) throw storageError(this.failure, 'upload', this.uri);
  }

  /** Hands the full (or last) part to an upload in the background, waiting while too many are in flight. */
  private async sendPart(): Promise<void> {
    if (this.uploadId === undefined) {
      const { CreateMultipartUploadCommand } = this.sdk;
      try {
        const created = await this.client.send(
          new CreateMultipartUploadCommand({ Bucket: this.location.bucket, Key: this.location.key, ...(this.checksums ? { ChecksumAlgorithm: 'CRC32' } : {}) }),
          { abortSignal: this.controller.signal },
        );
        this.uploadId = created.UploadId;
      } catch (err) {
        throw storageError(err, 'start the upload of', this.uri);
      }
      if (!this.uploadId) throw new ObjectStorageError(`The store gave no upload id for '${this.uri}'`, this.uri, 'failed');
    }
    const body = this.part!.subarray(0, this.partFill);
    const partNumber = ++this.partNumber;
    if (partNumber > MAX_PARTS) {
      throw new ObjectStorageError(`'${this.uri}' needs more than ${MAX_PARTS} parts of ${this.partSize} bytes`, this.uri, 'failed', {
        hint: 'Give the input size with --size (API: size) so the part size fits the image',
      });
    }
    this.part = undefined;
    this.partFill = 0;
    const { UploadPartCommand } = this.sdk;
    const task = this.client
      .send(
        new UploadPartCommand({
          Bucket: this.location.bucket,
          Key: this.location.key,
          UploadId: this.uploadId,
          PartNumber: partNumber,
          Body: body,
          ContentLength: body.length,
          ...(this.checksums ? { ChecksumAlgorithm: 'CRC32' } : {}),
        }),
        { abortSignal: this.controller.signal },
      )
      .then((result) => {
        if (!result.ETag) throw new Error(`part ${partNumber} came back without an ETag`);
        this.parts.push({ PartNumber: partNumber, ETag: result.ETag, ...(result.ChecksumCRC32 ? { ChecksumCRC32: result.ChecksumCRC32 } : {}) });
      })
      .catch((err: unknown) => {
        this.failure ??= err;
      })
      .finally(() => this.inflight.delete(task));
    this.inflight.add(task);
    while (this.inflight.size >= this.queueSize) await Promise.race(this.inflight);
    this.throwIfFailed();
  }
}

/** Attempts per ranged GET: the first and two retries, for failures a retry can fix. */
export const READ_ATTEMPTS = 3;
/** Delay before the first retry of a read (ms), doubled for the next. */
const READ_RETRY_DELAY = 100;

/** Options of {@link getObjectRange}. */
export interface RangeOptions {
  /** The ETag every range must match (If-Match): an object replaced mid-read fails instead of mixing versions. */
  etag?: string | undefined;
  signal?: AbortSignal | undefined;
}

/**
 * Bytes [start, end) of an object, in one ranged GET. Failures a retry can fix (a 5xx, a
 * throttle, a connection dropped while the body streamed in — which the SDK's own retries do
 * not cover) are retried up to {@link READ_ATTEMPTS} times in all; a missing object, a denial
 * or a replaced object fail at once.
 */
export async function getObjectRange(uri: string, start: number, end: number, options: RangeOptions = {}): Promise<Uint8Array> {
  const { bucket, key } = parseS3Uri(uri);
  const { GetObjectCommand } = loadS3Sdk();
  for (let attempt = 1; ; attempt++) {
    try {
      const got = await s3Client().send(
        new GetObjectCommand({ Bucket: bucket, Key: key, Range: `bytes=${start}-${end - 1}`, ...(options.etag ? { IfMatch: options.etag } : {}) }),
        options.signal ? { abortSignal: options.signal } : {},
      );
      const bytes = await got.Body!.transformToByteArray();
      if (bytes.length !== end - start) {
        throw new ObjectStorageError(`'${uri}' returned ${bytes.length} bytes for the range ${start}-${end - 1}`, uri, 'failed');
      }
      return bytes;
    } catch (err) {
      const failure = readFailure(err, uri);
      if (attempt >= READ_ATTEMPTS || !transient(failure) || options.signal?.aborted) throw failure;
      await new Promise((resolve) => setTimeout(resolve, READ_RETRY_DELAY * 2 ** (attempt - 1)));
    }
  }
}

/** A read's failure as our error; 412 on a read means the ETag no longer matches. */
function readFailure(err: unknown, uri: string): ObjectStorageError | AbortedError {
  const status = (err as { $metadata?: { httpStatusCode?: number } })?.$metadata?.httpStatusCode;
  if (status === 412 || (err as { name?: string })?.name === 'PreconditionFailed') {
    return new ObjectStorageError(`The object '${uri}' changed while it was read`, uri, 'failed', { cause: err, status, hint: 'Run again once the object is no longer being replaced' });
  }
  return storageError(err, 'read', uri);
}

/** Whether another attempt of the same request could succeed: no answer, 5xx, 429, or a short body. */
function transient(err: ObjectStorageError | AbortedError): boolean {
  if (!(err instanceof ObjectStorageError) || err.reason !== 'failed' || err.message.includes('changed while it was read')) return false;
  return err.status === undefined || err.status >= 500 || err.status === 429;
}

/** An object read as bytes in order: its size, and the chunks. */
export interface ObjectReader {
  size: number;
  chunks: AsyncIterable<Uint8Array>;
}

/** HEAD of an object that must exist: its size and ETag, or a not-found ObjectStorageError. */
export async function statObject(uri: string, signal?: AbortSignal): Promise<{ size: number; etag: string | undefined }> {
  const head = await headObject(uri, signal);
  if (!head) throw new ObjectStorageError(`The object '${uri}' does not exist`, uri, 'not-found', { hint: 'Check the bucket and key' });
  return head;
}

/** Opens an object for reading with ranged GETs (HEAD first: the size, and the ETag every range must match). */
export async function readObject(uri: string, options: { signal?: AbortSignal; chunkSize?: number } = {}): Promise<ObjectReader> {
  const head = await statObject(uri, options.signal);
  const chunkSize = options.chunkSize ?? READ_CHUNK;
  const size = head.size;
  const range = { etag: head.etag, signal: options.signal };
  async function* chunks(): AsyncGenerator<Uint8Array> {
    let next = 0;
    let ahead: Promise<Uint8Array> | undefined;
    const start = () => {
      if (next >= size) return undefined;
      const p = getObjectRange(uri, next, Math.min(size, next + chunkSize), range);
      p.catch(() => {});
      next += chunkSize;
      return p;
    };
    ahead = start();
    while (ahead) {
      const current = ahead;
      // Two GETs in flight: the next range downloads while this one is converted.
      ahead = start();
      yield await current;
    }
  }
  return { size, chunks: chunks() };
}
