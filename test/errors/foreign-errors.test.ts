/**
 * Errors that start outside the library come out as ours, with the original as `cause`: an HTTP
 * body cut off mid-transfer (the input of convert(), of createConvertStream(), of a sink in a
 * pipeline), an HTTP upload whose server hangs up (a Writable output), and aborts through a
 * pipeline's signal (Node's AbortError) or our own. Real servers on 127.0.0.1, no timers.
 */

import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { readdirSync } from 'node:fs';
import { createServer, get, request, type IncomingMessage } from 'node:http';
import type { AddressInfo } from 'node:net';
import { join } from 'node:path';
import { Readable, Writable } from 'node:stream';
import { pipeline } from 'node:stream/promises';
import {
  AbortedError,
  convert,
  createClusterizeStream,
  createConvertStream,
  createExportStream,
  createExternalSink,
  exportToFile,
  isQcow2StreamError,
  openImage,
  StreamError,
} from '../../src/index.js';
import { randomBytesAt, writeRawImage } from '../helpers/images.js';
import { tempDir } from '../helpers/qemu.js';

const MiB = 1024 * 1024;

/** A server that announces `total` bytes, sends the first `sent` of them, then drops the connection. */
async function dyingDownload(t: TestContext, total: number, sent: number): Promise<string> {
  const body = randomBytesAt(7, 0, sent);
  const server = createServer((_req, res) => {
    res.writeHead(200, { 'content-length': String(total) });
    res.write(body, () => res.socket?.destroy());
  });
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(() => server.close());
  return `http://127.0.0.1:${(server.address() as AddressInfo).port}/disk.raw`;
}

function download(url: string): Promise<IncomingMessage> {
  return new Promise((resolve, reject) => get(url, resolve).once('error', reject));
}

/** The error of a body cut off: our StreamError for the input, Node's error as its cause. */
function assertInputDied(err: unknown): true {
  assert.ok(err instanceof StreamError, `expected a StreamError, got ${String(err)}`);
  assert.ok(isQcow2StreamError(err));
  assert.equal(err.code, 'QCOW_ERR_STREAM');
  assert.equal(err.stream, 'input');
  assert.ok(err.cause instanceof Error);
  assert.equal(err.cause.message, 'aborted');
  assert.equal(err.systemCode, (err.cause as NodeJS.ErrnoException).code);
  assert.match(err.message, /^Cannot read the input stream: aborted/);
  return true;
}

test('convert(): an HTTP body cut off mid-transfer is a StreamError naming the input, and nothing is left', async (t) => {
  const dir = tempDir(t);
  const url = await dyingDownload(t, 8 * MiB, 3 * MiB + 100);
  await assert.rejects(convert({ input: await download(url), output: join(dir, 'disk.qcow2') }), assertInputDied);
  assert.deepEqual(readdirSync(dir), []);
});

test('createConvertStream(): finished rejects with the StreamError when the body it is fed dies', async (t) => {
  const dir = tempDir(t);
  const url = await dyingDownload(t, 8 * MiB, 2 * MiB);
  const stream = createConvertStream({ output: join(dir, 'disk.qcow2'), dataFile: join(dir, 'disk.data') });
  // pipeline() is Node's: it rejects with the source's own error. finished is ours.
  await assert.rejects(pipeline(await download(url), stream));
  await assert.rejects(stream.finished, assertInputDied);
  assert.deepEqual(readdirSync(dir), []);
});

test('a sink in a pipeline whose HTTP source dies: finished rejects with the StreamError', async (t) => {
  const dir = tempDir(t);
  const url = await dyingDownload(t, 8 * MiB, 1 * MiB + 7);
  const clusterize = createClusterizeStream();
  const sink = createExternalSink({ output: join(dir, 'disk.qcow2'), dataFile: join(dir, 'disk.data'), clusterSize: clusterize.clusterSize });
  await assert.rejects(pipeline(await download(url), clusterize, sink));
  await assert.rejects(sink.finished, assertInputDied);
  assert.deepEqual(readdirSync(dir), []);
});

test('exportToFile() into an HTTP upload whose server hangs up: a StreamError naming the output, with the socket error', async (t) => {
  const dir = tempDir(t);
  writeRawImage(join(dir, 'disk.raw'), 8 * MiB, [{ offset: 0, length: 8 * MiB, kind: 'random' }]);
  await convert({ input: join(dir, 'disk.raw'), output: join(dir, 'disk.qcow2') });
  const server = createServer((req) => req.once('data', () => req.socket.destroy()));
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  t.after(() => server.close());
  const upload = request(`http://127.0.0.1:${(server.address() as AddressInfo).port}/disk.raw`, { method: 'PUT' });
  const image = await openImage(join(dir, 'disk.qcow2'));
  t.after(() => image.close());
  await assert.rejects(exportToFile(image, upload), (err: unknown) => {
    assert.ok(err instanceof StreamError, `expected a StreamError, got ${String(err)}`);
    assert.equal(err.stream, 'raw image');
    assert.ok(err.cause instanceof Error);
    assert.ok(err.systemCode === 'ECONNRESET' || err.systemCode === 'EPIPE', `${err.systemCode}: ${err.message}`);
    assert.match(err.message, /^Cannot write to the raw image stream: /);
    return true;
  });
});

/** A byte source that gives one chunk, then aborts `controller` when asked for more (and gives nothing more). */
function abortingSource(controller: AbortController, reason?: unknown): Readable {
  let sent = false;
  return new Readable({
    read() {
      if (sent) controller.abort(reason);
      else this.push(randomBytesAt(3, 0, 256 * 1024));
      sent = true;
    },
  });
}

function assertAborted(err: unknown): true {
  assert.ok(err instanceof AbortedError, `expected an AbortedError, got ${String(err)}`);
  assert.equal(err.code, 'QCOW_ERR_ABORTED');
  return true;
}

test("pipeline(…, { signal }) around a sink: the sink's finished rejects with our AbortedError (pipeline() itself is Node's)", async (t) => {
  const dir = tempDir(t);
  const controller = new AbortController();
  const clusterize = createClusterizeStream();
  const sink = createExternalSink({ output: join(dir, 'disk.qcow2'), dataFile: join(dir, 'disk.data'), clusterSize: clusterize.clusterSize });
  // An AbortedError as the reason (as the CLI's Ctrl-C gives) is what finished rejects with.
  const reason = new AbortedError('Interrupted by SIGINT');
  await assert.rejects(pipeline(abortingSource(controller, reason), clusterize, sink, { signal: controller.signal }), { name: 'AbortError' });
  await assert.rejects(sink.finished, (err: unknown) => assertAborted(err) && err === reason);
  assert.deepEqual(readdirSync(dir), []);
});

test('pipeline(…, { signal }) around createConvertStream(): finished rejects with our AbortedError', async (t) => {
  const dir = tempDir(t);
  const controller = new AbortController();
  const stream = createConvertStream({ output: join(dir, 'disk.qcow2') });
  await assert.rejects(pipeline(abortingSource(controller), stream, { signal: controller.signal }));
  // No reason given: the DOMException abort() makes, inside Node's AbortError, is kept as the cause.
  await assert.rejects(stream.finished, (err: unknown) => assertAborted(err) && (err as Error).cause instanceof Error);
  assert.deepEqual(readdirSync(dir), []);
});

test('the signal given to createConvertStream() instead: pipeline() too rejects with our AbortedError', async (t) => {
  const dir = tempDir(t);
  const controller = new AbortController();
  const stream = createConvertStream({ output: join(dir, 'disk.qcow2'), signal: controller.signal });
  await assert.rejects(pipeline(abortingSource(controller), stream), assertAborted);
  await assert.rejects(stream.finished, assertAborted);
  assert.deepEqual(readdirSync(dir), []);
});

test('pipeline(createExportStream(image), …, { signal }): finished rejects with our AbortedError', async (t) => {
  const dir = tempDir(t);
  writeRawImage(join(dir, 'disk.raw'), 4 * MiB, [{ offset: 0, length: 4 * MiB, kind: 'random' }]);
  await convert({ input: join(dir, 'disk.raw'), output: join(dir, 'disk.qcow2') });
  const image = await openImage(join(dir, 'disk.qcow2'));
  t.after(() => image.close());
  const controller = new AbortController();
  const stream = createExportStream(image);
  // The reader aborts on its first chunk and never asks for more.
  const reader = new Writable({ write: () => controller.abort() });
  await assert.rejects(pipeline(stream, reader, { signal: controller.signal }), { name: 'AbortError' });
  await assert.rejects(stream.finished, assertAborted);
});
