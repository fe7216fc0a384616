/**
 * Ingest a disk image streamed over HTTP straight into qcow2, without saving the raw image
 * first: the HTTP response body is the `input` of `convert()`.
 *
 *   node --import tsx examples/http-ingest.ts [DIR]
 *
 * To be self-contained the example starts its own server on 127.0.0.1 (an ephemeral port) that
 * streams a generated raw image in odd-sized chunks and announces its SHA-256 in a header, as
 * image mirrors publish checksums. The client:
 *
 * 1. GETs the image and passes the response (a Node Readable) to `convert()` with the size
 *    from Content-Length. With a known size the qcow2 metadata is written while the data
 *    flows, and a body that ends early (or runs long) is an InputSizeError, not a short image;
 * 2. checks the result and hashes what the image reads as (`exportStream`), which must match
 *    the server's checksum;
 * 3. closes the server.
 *
 * Only the outputs (disk.qcow2 + disk.data) touch the disk. DIR (created if missing) keeps them;
 * without it a temporary directory is used and removed. In your own code, import from the
 * package instead of the source tree:
 *
 *   import { convert, openImage, exportStream, checkImage } from 'qcow2-stream';
 *
 * With `fetch()` instead of node:http, pass `Readable.fromWeb(response.body)` as the input.
 */

import { createServer, get, type IncomingMessage, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { Readable } from 'node:stream';
import { createHash, randomBytes } from 'node:crypto';
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { checkImage, convert, exportStream, isQcow2StreamError, openImage } from '../src/index.js';

const MiB = 1024 * 1024;

/** The image the server offers: 12 MiB + 1536 bytes (not a whole number of clusters), mostly empty. */
function makeImage(): Buffer {
  const image = Buffer.alloc(12 * MiB + 1536);
  randomBytes(512).copy(image, 0); // a boot sector
  randomBytes(2 * MiB).copy(image, 1 * MiB);
  randomBytes(300_000).copy(image, 7 * MiB + 12_345); // unaligned: partial clusters at both ends
  randomBytes(1536).copy(image, image.length - 1536); // the short last cluster
  return image;
}

/** A server streaming `image` in 100,000-byte chunks (cluster boundaries fall anywhere in them). */
async function startServer(image: Buffer): Promise<{ server: Server; url: string }> {
  const sha256 = createHash('sha256').update(image).digest('hex');
  const server = createServer((req, res) => {
    if (req.url !== '/disk.raw') {
      res.writeHead(404).end();
      return;
    }
    res.writeHead(200, { 'content-type': 'application/octet-stream', 'content-length': image.length, 'x-image-sha256': sha256 });
    function* chunks() {
      for (let at = 0; at < image.length; at += 100_000) yield image.subarray(at, at + 100_000);
    }
    Readable.from(chunks()).pipe(res); // pipe() honours the client's back-pressure
  });
  await new Promise<void>((resolve, reject) => server.once('error', reject).listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  return { server, url: `http://127.0.0.1:${port}/disk.raw` };
}

function httpGet(url: string): Promise<IncomingMessage> {
  return new Promise((resolve, reject) => get(url, resolve).once('error', reject));
}

async function main(): Promise<void> {
  const dir = process.argv[2] ?? mkdtempSync(join(tmpdir(), 'qcow2-stream-http-ingest-'));
  mkdirSync(dir, { recursive: true });
  const qcow2 = join(dir, 'disk.qcow2');
  const { server, url } = await startServer(makeImage());
  try {
    console.log(`server: ${url}`);
    const response = await httpGet(url);
    if (response.statusCode !== 200) throw new Error(`GET ${url}: HTTP ${response.statusCode}`);
    const size = Number(response.headers['content-length']);
    const expectedSha256 = response.headers['x-image-sha256'];
    console.log(`GET disk.raw: ${size} bytes, sha256 ${String(expectedSha256).slice(0, 16)}…`);

    const summary = await convert({
      input: response, // the body, straight from the socket
      size, // from Content-Length: metadata streams alongside, and a truncated body is an error
      output: qcow2,
      dataFile: join(dir, 'disk.data'), // stored as 'disk.data', relative to the image's directory
      overwrite: true,
      signal: AbortSignal.timeout(30_000), // a stalled server must not hang the ingest for ever
    });
    console.log(
      `converted: virtual size ${summary.virtualSize}, ${summary.dataClusters} data clusters, ` +
        `${summary.zeroClusters} zero clusters left as holes, metadata ${summary.metadataLayout}, ${summary.seconds.toFixed(3)} s`,
    );

    // Verify: a clean image whose guest bytes hash to the server's checksum.
    const check = await checkImage(qcow2);
    if (!check.clean) throw new Error(`the image is not clean: ${JSON.stringify(check.findings)}`);
    const image = await openImage(qcow2);
    const hash = createHash('sha256');
    try {
      for await (const chunk of exportStream(image)) hash.update(chunk as Uint8Array);
    } finally {
      await image.close();
    }
    const actual = hash.digest('hex');
    console.log(`check: clean; sha256 of the image's contents: ${actual.slice(0, 16)}… ${actual === expectedSha256 ? 'matches' : 'DOES NOT MATCH'}`);
    if (actual !== expectedSha256) throw new Error('the ingested image does not match the checksum the server sent');
    console.log('http-ingest: ok');
  } finally {
    server.closeAllConnections(); // keep-alive sockets would otherwise hold close() open
    await new Promise<void>((resolve) => server.close(() => resolve()));
    if (process.argv[2] === undefined) rmSync(dir, { recursive: true, force: true });
  }
}

main().catch((err: unknown) => {
  if (isQcow2StreamError(err)) console.error(`http-ingest failed: ${err.code}: ${err.message}${err.hint ? ` (${err.hint})` : ''}`);
  else console.error('http-ingest failed:', err);
  process.exit(1);
});
