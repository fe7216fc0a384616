/**
 * convert() with objects (`s3://`) on either side, as thin rewrites of its options so the one
 * conversion path stays the only one:
 *
 * - an object input is probed like a file: a raw one becomes an iterable of ranged GETs with
 *   the object's size declared (the metadata then streams with the data, and a short object is
 *   an InputSizeError); an image (qcow2 with its data file, VMDK…) is read by its reader;
 * - an internal image bound for an object is written to a local temporary file first (its
 *   header is written last and dedup reads clusters back, neither of which an upload allows),
 *   then uploaded; the temporary file holds only the stored clusters (zeros are left out).
 */

import { mkdtemp, open, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { InvalidArgumentError } from '../errors.js';
import { OffsetWriter } from '../io/output.js';
import { readExactly } from '../io/files.js';
import type { ConvertOptions, ConvertSummary } from './convert.js';

/**
 * Options for an `s3://` input, probed like a file unless `inputFormat` says: a raw object is
 * replaced by its ranged-GET reader (and its size); an image format comes back as
 * `inputFormat`, so convert() opens the object through that format's reader (src/read/
 * object-source.ts gives the readers random access to objects).
 */
export async function withObjectInput(options: ConvertOptions & { input: string }): Promise<ConvertOptions> {
  const uri = options.input;
  if (uri === options.output || uri === options.dataFile) {
    throw new InvalidArgumentError(`The output '${uri}' is the input itself; refusing to overwrite it`);
  }
  if (options.inputFormat === undefined) {
    const { probeFormat } = await import('../read/probe.js');
    const format = await probeFormat(uri, options.onWarning ? { onWarning: options.onWarning } : {});
    if (format !== 'raw') return { ...options, inputFormat: format };
  }
  const { readObject } = await import('../io/s3.js');
  const object = await readObject(uri, options.signal ? { signal: options.signal } : {});
  return { ...options, input: object.chunks, size: options.size ?? object.size };
}

/** Runs `run` with the internal image going to a temporary file, then uploads that file to `options.output`. */
export async function internalToObject(options: ConvertOptions, run: (options: ConvertOptions) => Promise<ConvertSummary>): Promise<ConvertSummary> {
  const uri = options.output as string;
  const overwrite = options.overwrite ?? false;
  // Fails before any work when the key is taken (the upload checks again at the end).
  const { headObject } = await import('../io/s3.js');
  if (!overwrite && (await headObject(uri)) !== undefined) {
    const { ObjectStorageError } = await import('../errors.js');
    throw new ObjectStorageError(`The object '${uri}' already exists`, uri, 'exists', { hint: 'Remove it first, or replace it with --force (API: overwrite: true)' });
  }
  const dir = await mkdtemp(join(process.env['QCOW2_STREAM_SPOOL_DIR'] ?? tmpdir(), 'qcow2-stream-'));
  try {
    const local = join(dir, 'image.qcow2');
    // Nothing to make durable locally: the upload is what counts.
    const summary = await run({ ...options, output: local, sync: false });
    await uploadFile(local, uri, overwrite, options.signal);
    return summary;
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

/** Streams a local file into an object through OffsetWriter (multipart, aborted on failure). */
async function uploadFile(path: string, uri: string, overwrite: boolean, signal: AbortSignal | undefined): Promise<void> {
  const handle = await open(path, 'r');
  try {
    const { size } = await handle.stat();
    const writer = await OffsetWriter.create(uri, { label: 'image', overwrite, sizeHint: size });
    try {
      const chunk = 8 * 1024 * 1024;
      for (let at = 0; at < size; at += chunk) {
        if (signal?.aborted) throw signal.reason;
        const bytes = await readExactly(handle, Math.min(chunk, size - at), at, path, 'spooled image');
        await writer.write(at, bytes);
      }
      await writer.finish(size);
      await writer.commit();
    } catch (err) {
      await writer.abort();
      throw err;
    }
  } finally {
    await handle.close();
  }
}

