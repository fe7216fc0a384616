/**
 * An NBD client (the Network Block Device protocol, doc/proto.md of the NBD project): the reading
 * side that backup ingestion needs.
 *
 * - URIs of the NBD URI spec: `nbd://host[:port]/export`, `nbd+unix:///export?socket=PATH`, and
 *   `nbds://` / `nbds+unix://` for TLS (`tls-certificates=DIR`, `tls-hostname=NAME`).
 * - Fixed newstyle negotiation: STARTTLS, EXTENDED_HEADERS (else STRUCTURED_REPLY, else simple
 *   replies), SET_META_CONTEXT, GO with the block-size constraints.
 * - Transmission: READ and BLOCK_STATUS with many requests in flight, replies parsed by a push
 *   state machine that copies read payloads straight into the caller's buffer (OFFSET_HOLE chunks
 *   are reported as ranges, not copied), error chunks as typed errors, and DISC at close.
 *
 * The server is untrusted input: every length and offset it sends is checked against what was
 * asked before it drives a copy or an allocation, a stall longer than the timeout fails every
 * pending request, and every failure is one of the NbdConnectionError / NbdProtocolError /
 * NbdServerError classes, naming the URI.
 */

import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import type { Duplex } from 'node:stream';
import { InvalidArgumentError, NbdConnectionError, NbdProtocolError, NbdServerError, Qcow2StreamError } from '../errors.js';
import { allocIoBuffer } from './buffers.js';

// ─── Protocol constants (proto.md) ───────────────────────────────────────────────────────────

const NBDMAGIC = 0x4e42444d41474943n;
const IHAVEOPT = 0x49484156454f5054n;
const CLISERV_MAGIC = 0x00420281861253n; // oldstyle negotiation, which we do not speak
const OPTION_REPLY_MAGIC = 0x3e889045565a9n;

const FLAG_FIXED_NEWSTYLE = 1;
const FLAG_NO_ZEROES = 2;

const OPT = { STARTTLS: 5, GO: 7, STRUCTURED_REPLY: 8, SET_META_CONTEXT: 10, EXTENDED_HEADERS: 11 } as const;
const REP = { ACK: 1, INFO: 3, META_CONTEXT: 4 } as const;
const REP_ERROR_BIT = 0x8000_0000;
const REP_ERRORS: Record<number, string> = {
  1: 'NBD_REP_ERR_UNSUP',
  2: 'NBD_REP_ERR_POLICY',
  3: 'NBD_REP_ERR_INVALID',
  4: 'NBD_REP_ERR_PLATFORM',
  5: 'NBD_REP_ERR_TLS_REQD',
  6: 'NBD_REP_ERR_UNKNOWN',
  7: 'NBD_REP_ERR_SHUTDOWN',
  8: 'NBD_REP_ERR_BLOCK_SIZE_REQD',
  9: 'NBD_REP_ERR_TOO_BIG',
  10: 'NBD_REP_ERR_EXT_HEADER_REQD',
};
const INFO_EXPORT = 0;
const INFO_BLOCK_SIZE = 3;

/** Transmission flags (NBD_FLAG_*) from NBD_INFO_EXPORT. */
export const NBD_FLAG = {
  HAS_FLAGS: 1 << 0,
  READ_ONLY: 1 << 1,
  SEND_FLUSH: 1 << 2,
  SEND_FUA: 1 << 3,
  ROTATIONAL: 1 << 4,
  SEND_TRIM: 1 << 5,
  SEND_WRITE_ZEROES: 1 << 6,
  SEND_DF: 1 << 7,
  CAN_MULTI_CONN: 1 << 8,
} as const;

const REQUEST_MAGIC = 0x25609513;
const EXTENDED_REQUEST_MAGIC = 0x21e41c71;
const SIMPLE_REPLY_MAGIC = 0x67446698;
const STRUCTURED_REPLY_MAGIC = 0x668e33ef;
const EXTENDED_REPLY_MAGIC = 0x6e8a278c;

const CMD = { READ: 0, DISC: 2, BLOCK_STATUS: 7 } as const;
const REPLY_FLAG_DONE = 1;
const CHUNK = { NONE: 0, OFFSET_DATA: 1, OFFSET_HOLE: 2, BLOCK_STATUS: 5, BLOCK_STATUS_EXT: 6, ERROR: 0x8001, ERROR_OFFSET: 0x8002 } as const;
const CHUNK_ERROR_BIT = 0x8000;

/** NBD error values (proto.md "Error values"), named like errno. */
const NBD_ERRORS: Record<number, string> = {
  1: 'EPERM',
  5: 'EIO',
  12: 'ENOMEM',
  22: 'EINVAL',
  28: 'ENOSPC',
  75: 'EOVERFLOW',
  95: 'ENOTSUP',
  108: 'ESHUTDOWN',
};

/** `base:allocation` flags: the extent is a hole / reads as zeros. */
export const NBD_STATE_HOLE = 1;
export const NBD_STATE_ZERO = 2;
/** `qemu:dirty-bitmap:NAME` flag: the extent changed since the bitmap was created or cleared. */
export const NBD_STATE_DIRTY = 1;

/** The meta context of allocation status. */
export const BASE_ALLOCATION = 'base:allocation';
/** The meta context qemu publishes a dirty bitmap under. */
export function dirtyBitmapContext(bitmap: string): string {
  return `qemu:dirty-bitmap:${bitmap}`;
}

// ─── Bounds on what a server may make us hold ────────────────────────────────────────────────

/** The longest option reply we accept during negotiation (names and descriptions are ≤ 4 KiB). */
const MAX_OPTION_REPLY = 64 * 1024;
/** Option replies per option (meta contexts, infos) before we call it a flood. */
const MAX_OPTION_REPLIES = 1024;
/** The longest non-data chunk payload: block status (2 MiB ≈ 262,000 extents) or an error. */
const MAX_CHUNK_PAYLOAD = 2 * 1024 * 1024;
/** The largest read request we send (the server's maximum block size may lower it). */
export const MAX_READ_REQUEST = 32 * 1024 * 1024;
/** The longest window one BLOCK_STATUS asks about. */
const STATUS_WINDOW = 2 ** 30;
/** Requests in flight at once on one connection. */
const MAX_IN_FLIGHT = 64;
/**
 * The buffer a plain socket reads headers, small payloads and the first bytes of data into
 * (Node's `onread`): reused, so receiving allocates nothing per read.
 */
const SCRATCH_SIZE = 64 * 1024;
/**
 * Read payloads with at least this much left are read by the socket straight into the
 * caller's buffer; shorter tails go through the scratch buffer, which then also takes the
 * next reply's header in the same read.
 */
const DIRECT_MIN = 32 * 1024;
/** The default time without progress before a pending request fails. */
export const DEFAULT_NBD_TIMEOUT = 30_000;

// ─── URIs ────────────────────────────────────────────────────────────────────────────────────

/** Where an NBD URI points. */
export interface NbdAddress {
  /** The URI as given (for messages). */
  uri: string;
  /** `tcp` (host, port) or `unix` (socket). */
  transport: 'tcp' | 'unix';
  /** TCP: the host name or address (IPv6 without brackets). */
  host?: string;
  /** TCP: the port (10809 by default). */
  port?: number;
  /** Unix: the socket path (`?socket=`). */
  socket?: string;
  /** The export name ('' is the default export). */
  exportName: string;
  /** nbds: negotiate TLS (NBD_OPT_STARTTLS) and refuse a server that cannot. */
  tls: boolean;
  /** `tls-certificates=DIR`: ca-cert.pem, client-cert.pem and client-key.pem in DIR. */
  tlsCertificates?: string;
  /** `tls-hostname=NAME`: the name the server's certificate must carry. */
  tlsHostname?: string;
}

/** True when `text` is an NBD URI (nbd://, nbds://, nbd+unix://, nbds+unix://). */
export function isNbdUri(text: string): boolean {
  return /^nbds?(\+unix)?:\/\//i.test(text);
}

/** Parses an NBD URI (InvalidArgumentError on anything malformed). */
export function parseNbdUri(uri: string): NbdAddress {
  const match = /^(nbds?)(\+unix)?:\/\//i.exec(uri);
  if (!match) throw new InvalidArgumentError(`'${uri}' is not an NBD URI`, { hint: 'Use nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH' });
  let url: URL;
  try {
    url = new URL(uri);
  } catch {
    throw new InvalidArgumentError(`'${uri}' is not a valid NBD URI`);
  }
  const tls = match[1]!.toLowerCase() === 'nbds';
  const unix = match[2] !== undefined;
  if (url.username || url.password) throw new InvalidArgumentError(`The NBD URI '${uri}' carries a user name or password, which NBD has no use for`);
  let exportName: string;
  try {
    // The path after the first '/' is the export name, percent-decoded.
    exportName = decodeURIComponent(url.pathname.replace(/^\//, ''));
  } catch {
    throw new InvalidArgumentError(`The export name in '${uri}' is not valid percent-encoding`);
  }
  if (Buffer.byteLength(exportName) > 4096) throw new InvalidArgumentError(`The export name in '${uri}' is longer than 4096 bytes`);
  const query = url.searchParams;
  const address: NbdAddress = { uri, transport: unix ? 'unix' : 'tcp', exportName, tls };
  const certificates = query.get('tls-certificates');
  if (certificates !== null) address.tlsCertificates = certificates;
  const hostname = query.get('tls-hostname');
  if (hostname !== null) address.tlsHostname = hostname;
  if (unix) {
    if (url.host !== '') throw new InvalidArgumentError(`'${uri}': an nbd+unix URI has no host (nbd+unix:///EXPORT?socket=PATH)`);
    const socket = query.get('socket');
    if (!socket) throw new InvalidArgumentError(`'${uri}' names no socket`, { hint: 'Add ?socket=PATH' });
    address.socket = socket;
  } else {
    if (url.hostname === '') throw new InvalidArgumentError(`'${uri}' names no host`);
    address.host = url.hostname.replace(/^\[(.*)\]$/, '$1');
    address.port = url.port === '' ? 10809 : Number(url.port);
  }
  return address;
}

// ─── The client ──────────────────────────────────────────────────────────────────────────────

/** TLS material (PEM file paths). Given ones override the URI's `tls-certificates` directory. */
export interface NbdTlsOptions {
  /** CA certificate(s) the server's certificate must chain to. */
  ca?: string;
  /** Our certificate, for servers that verify their peers (qemu's default). */
  cert?: string;
  /** Our private key. */
  key?: string;
  /** The name the server's certificate must carry (default: the URI's host, or `localhost` on a Unix socket). */
  hostname?: string;
}

export interface NbdConnectOptions {
  /** Meta contexts to negotiate (`base:allocation`, `qemu:dirty-bitmap:NAME`…). */
  metaContexts?: readonly string[];
  /** Contexts among `metaContexts` the server must publish; missing ones fail the connection. */
  requiredContexts?: readonly string[];
  /** TLS material; required in effect for nbds:// unless the URI names a certificate directory. */
  tls?: NbdTlsOptions;
  /** Milliseconds without progress (connect, negotiation, a pending reply) before giving up. Default 30 s. */
  timeout?: number;
  /** Cancels connecting and negotiating (an NbdConnectionError); a connected client is closed with close(). */
  signal?: AbortSignal;
  /** Test hook: skip NBD_OPT_EXTENDED_HEADERS (a 32-bit-only client). @internal */
  noExtendedHeaders?: boolean;
}

/** Block-size constraints from NBD_INFO_BLOCK_SIZE (defaults when the server sends none). */
export interface NbdBlockSize {
  /** Requests are multiples of this (a power of two up to 64 KiB). */
  minimum: number;
  /** The size the server prefers. */
  preferred: number;
  /** The largest request the server takes. */
  maximum: number;
}

/** One extent of a meta context: `length` bytes with `flags`. */
export interface NbdExtent {
  /** Guest byte offset. */
  offset: number;
  /** Bytes. */
  length: number;
  /** The context's flags (NBD_STATE_HOLE / NBD_STATE_ZERO, or NBD_STATE_DIRTY). */
  flags: number;
}

/** What a read found besides data: ranges (relative to the read's offset) the server reported as holes. */
export interface NbdReadResult {
  /** [start, end) pairs relative to the read's offset, in no particular order; their bytes were not written. */
  holes: Array<[number, number]>;
}

/** Counters for tests and progress. */
export interface NbdStats {
  /** Read requests sent. */
  reads: number;
  /** Payload bytes of data received (OFFSET_DATA chunks and simple read replies). */
  dataBytes: number;
  /** Bytes the server answered as holes (OFFSET_HOLE), never transferred. */
  holeBytes: number;
  /** BLOCK_STATUS requests sent. */
  blockStatusRequests: number;
}

interface Pending {
  cookie: number;
  type: number;
  offset: number;
  length: number;
  /** READ: where the payload lands. */
  target?: Uint8Array;
  targetOffset: number;
  /** READ: [start, end) relative to offset, for the coverage check. */
  covered: Array<[number, number]>;
  holes: Array<[number, number]>;
  /** BLOCK_STATUS: extents per context id. */
  statuses: Map<number, NbdExtent[]>;
  failure?: Qcow2StreamError;
  resolve(value: unknown): void;
  reject(error: Qcow2StreamError): void;
}

type Stream = Duplex & { setTimeout(ms: number, cb?: () => void): unknown; destroy(error?: Error): unknown };

/**
 * A connection to one NBD export, negotiated and ready: `read`, `blockStatus`, `close`.
 * Requests may be issued concurrently; replies are matched by cookie.
 */
export class NbdClient {
  /** The export's size in bytes. */
  size = 0;
  /** Transmission flags (NBD_FLAG). */
  flags = 0;
  /** Block-size constraints from NBD_INFO_BLOCK_SIZE (requests honour them). */
  blockSize: NbdBlockSize = { minimum: 1, preferred: 4096, maximum: MAX_READ_REQUEST };
  /** Structured replies negotiated (else simple replies: no holes, no block status). */
  structuredReplies = false;
  /** 64-bit extended headers negotiated. */
  extendedHeaders = false;
  /** TLS in use. */
  tls = false;
  /** Negotiated meta contexts: name → id. */
  readonly contexts = new Map<string, number>();
  /** What this connection has transferred. */
  readonly stats: NbdStats = { reads: 0, dataBytes: 0, holeBytes: 0, blockStatusRequests: 0 };

  private stream!: Stream;
  /** While the socket connects: gives up on it (cancellation). */
  private abortOpen: ((error: Qcow2StreamError) => void) | undefined;
  private pendingReadBytes = 0;
  private readonly timeout: number;
  private readonly pending = new Map<number, Pending>();
  /** Requests not sent yet because MAX_IN_FLIGHT are pending. */
  private readonly waiting: Pending[] = [];
  private nextCookie = 1;
  private failure: Qcow2StreamError | undefined;
  private closing = false;
  private negotiating = true;
  // Negotiation: a plain byte queue read with need(n).
  private queue: Buffer[] = [];
  private queued = 0;
  private wakeReader: (() => void) | undefined;
  // Transmission: the reply parser's state.
  private readonly header = Buffer.alloc(32);
  private headerHave = 0;
  private headerNeed = 4;
  private state: 'header' | 'data' | 'payload' = 'header';
  private current: Pending | undefined;
  private chunkFlags = 0;
  private chunkType = 0;
  private chunkLength = 0;
  /** 'data' state: where the next payload byte goes, and how many are left. */
  private dataAt = 0;
  private dataLeft = 0;
  private payload: Buffer | undefined;
  private payloadHave = 0;
  /** Plain sockets read into these (Node's `onread`), never allocating per read; TLS sockets emit 'data'. */
  private readonly scratch = allocIoBuffer(SCRATCH_SIZE);
  /** The view of a read's target handed to the socket as its next read buffer, if any. */
  private direct: Uint8Array | undefined;
  private readonly onData = (chunk: Buffer) => this.receive(chunk, false);
  private readonly onError = (err: Error) => this.fail(new NbdConnectionError(`The NBD connection to ${this.address.uri} failed: ${err.message}`, { uri: this.address.uri, cause: err }));
  private readonly onClose = () => {
    if (!this.closing) this.fail(new NbdConnectionError(`The NBD server at ${this.address.uri} closed the connection`, { uri: this.address.uri }));
  };
  private readonly onTimeout = () => {
    if (this.negotiating || this.pending.size > 0) {
      this.fail(new NbdConnectionError(`The NBD server at ${this.address.uri} sent nothing for ${this.timeout / 1000} s`, { uri: this.address.uri, hint: 'Is the server alive? Raise the timeout for a slow link' }));
    }
  };

  private constructor(
    /** Where the client is connected. */
    readonly address: NbdAddress,
    private readonly options: NbdConnectOptions,
  ) {
    this.timeout = options.timeout ?? DEFAULT_NBD_TIMEOUT;
    if (!(this.timeout > 0)) throw new InvalidArgumentError(`Invalid NBD timeout ${this.timeout}`);
  }

  /** Connects to `uri` (or a parsed address) and negotiates. Every failure is a typed NBD error naming the URI. */
  static async connect(uri: string | NbdAddress, options: NbdConnectOptions = {}): Promise<NbdClient> {
    const address = typeof uri === 'string' ? parseNbdUri(uri) : uri;
    const client = new NbdClient(address, options);
    const tlsMaterial = address.tls ? client.loadTlsMaterial() : undefined;
    const { signal } = options;
    const cancelled = () => new NbdConnectionError(`Connecting to the NBD server at ${address.uri} was cancelled`, { uri: address.uri });
    if (signal?.aborted) throw cancelled();
    const onAbort = () => client.cancelConnect(cancelled());
    signal?.addEventListener('abort', onAbort, { once: true });
    try {
      await client.open();
      await client.negotiate(tlsMaterial);
    } catch (err) {
      client.closing = true;
      client.stream?.destroy();
      throw client.failure ?? err;
    } finally {
      signal?.removeEventListener('abort', onAbort);
    }
    return client;
  }

  /**
   * Another connection to the same export, for reads only (no meta contexts), with this one's
   * TLS material and timeout: for servers that allow several (NBD_FLAG_CAN_MULTI_CONN), so
   * reads can be spread over them. The server must describe the same export on it.
   */
  async connectSibling(options: { signal?: AbortSignal } = {}): Promise<NbdClient> {
    const { metaContexts: _m, requiredContexts: _r, signal: _s, ...rest } = this.options;
    const sibling = await NbdClient.connect(this.address, { ...rest, ...(options.signal ? { signal: options.signal } : {}) });
    if (sibling.size !== this.size || sibling.structuredReplies !== this.structuredReplies || sibling.blockSize.minimum !== this.blockSize.minimum) {
      await sibling.close();
      throw this.protocol(`described the export differently on a second connection (${sibling.size} bytes, minimum block ${sibling.blockSize.minimum}; the first: ${this.size}, ${this.blockSize.minimum})`);
    }
    return sibling;
  }

  /** Bytes of read requests sent or queued and not answered yet (to spread reads over connections). */
  get readBytesPending(): number {
    return this.pendingReadBytes;
  }

  /** Aborts connecting or negotiating with `error` (NbdConnectOptions.signal). */
  private cancelConnect(error: Qcow2StreamError): void {
    if (!this.negotiating) return;
    if (this.stream) return this.fail(error);
    this.abortOpen?.(error);
  }

  /** The connection's error, if it has failed (later requests reject with it). */
  get error(): Qcow2StreamError | undefined {
    return this.failure;
  }

  /** The largest read one request may ask for (the server's maximum, capped at 32 MiB). */
  get maxRead(): number {
    return Math.min(this.blockSize.maximum, MAX_READ_REQUEST);
  }

  /**
   * Reads `length` bytes at `offset` into `target[targetOffset…]`. Ranges the server reports as
   * holes are not written (the caller zeroes or skips them); see {@link NbdReadResult}.
   */
  read(offset: number, length: number, target: Uint8Array, targetOffset = 0): Promise<NbdReadResult> {
    this.checkRange(offset, length);
    if (length > this.maxRead) throw new InvalidArgumentError(`NBD read of ${length} bytes exceeds the server's maximum of ${this.maxRead}`);
    if (targetOffset < 0 || targetOffset + length > target.length) throw new InvalidArgumentError('NBD read target too small');
    this.stats.reads++;
    return this.request(CMD.READ, offset, length, { target, targetOffset }) as Promise<NbdReadResult>;
  }

  /**
   * BLOCK_STATUS over [offset, offset+length) (length is clipped to a window the protocol can
   * carry): the extents of every negotiated context, by context name. The server may answer
   * for less than asked; each list starts at `offset` and covers at least one byte.
   */
  async blockStatus(offset: number, length: number): Promise<Map<string, NbdExtent[]>> {
    if (this.contexts.size === 0) throw new InvalidArgumentError(`The NBD connection to ${this.address.uri} has no meta context to ask about`);
    const window = Math.min(length, this.size - offset, STATUS_WINDOW);
    this.checkRange(offset, window);
    this.stats.blockStatusRequests++;
    const byId = (await this.request(CMD.BLOCK_STATUS, offset, window, {})) as Map<number, NbdExtent[]>;
    const result = new Map<string, NbdExtent[]>();
    for (const [name, id] of this.contexts) result.set(name, byId.get(id)!);
    return result;
  }

  /** Sends NBD_CMD_DISC and closes the connection (pending requests fail). Never throws. */
  async close(): Promise<void> {
    if (this.closing) return;
    this.closing = true;
    const stream = this.stream;
    if (!this.failure && !stream.destroyed) {
      stream.write(this.encodeRequest(CMD.DISC, 0, 0, 0));
      stream.end();
    }
    this.failAll(new NbdConnectionError(`The NBD connection to ${this.address.uri} was closed`, { uri: this.address.uri }));
    await new Promise<void>((resolve) => {
      if (stream.destroyed) return resolve();
      const timer = setTimeout(() => {
        stream.destroy();
        resolve();
      }, 2000);
      timer.unref?.();
      stream.once('close', () => {
        clearTimeout(timer);
        resolve();
      });
    });
  }

  // ─── Connection and negotiation ────────────────────────────────────────────────────────────

  private loadTlsMaterial(): { ca?: Buffer; cert?: Buffer; key?: Buffer } {
    const given = this.options.tls ?? {};
    const dir = this.address.tlsCertificates;
    const pick = (explicit: string | undefined, file: string, required: boolean): Buffer | undefined => {
      const path = explicit ?? (dir === undefined ? undefined : join(dir, file));
      if (path === undefined) return undefined;
      try {
        return readFileSync(path);
      } catch (err) {
        if (!required && explicit === undefined && (err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
        throw new InvalidArgumentError(`Cannot read the TLS file '${path}' for ${this.address.uri}: ${(err as Error).message}`, { cause: err });
      }
    };
    const material: { ca?: Buffer; cert?: Buffer; key?: Buffer } = {};
    const ca = pick(given.ca, 'ca-cert.pem', true);
    const cert = pick(given.cert, 'client-cert.pem', false);
    const key = pick(given.key, 'client-key.pem', false);
    if (ca) material.ca = ca;
    if (cert) material.cert = cert;
    if (key) material.key = key;
    if (!ca) {
      throw new InvalidArgumentError(`${this.address.uri} asks for TLS but no CA certificate was given to check the server with`, {
        hint: 'Pass --tls-ca FILE (and --tls-cert/--tls-key if the server checks clients; API: nbd: { tls: { ca, cert, key } }), or add ?tls-certificates=DIR to the URI',
      });
    }
    return material;
  }

  private open(): Promise<void> {
    const net = process.getBuiltinModule('node:net');
    const { address } = this;
    return new Promise((resolve, reject_) => {
      const reject = (error: Qcow2StreamError) => {
        this.abortOpen = undefined;
        reject_(error);
      };
      // Without TLS the socket reads into buffers we choose (see nextReadBuffer); a socket that
      // STARTTLS wraps later keeps Node's own reads, which TLS needs (and 'data' events).
      const onread = address.tls ? {} : { onread: { buffer: () => this.nextReadBuffer(), callback: (n: number, buf: Uint8Array) => this.onRead(n, buf) } };
      const socket = address.transport === 'unix' ? net.connect({ path: address.socket!, ...onread }) : net.connect({ host: address.host!, port: address.port!, ...onread });
      const where = address.transport === 'unix' ? `socket ${address.socket}` : `${address.host}:${address.port}`;
      this.abortOpen = (error) => {
        clearTimeout(timer);
        socket.destroy();
        reject(error);
      };
      const timer = setTimeout(() => {
        socket.destroy();
        reject(new NbdConnectionError(`Cannot connect to the NBD server at ${address.uri}: no answer from ${where} in ${this.timeout / 1000} s`, { uri: address.uri }));
      }, this.timeout);
      socket.once('error', (err: NodeJS.ErrnoException) => {
        clearTimeout(timer);
        reject(new NbdConnectionError(`Cannot connect to the NBD server at ${address.uri}: ${err.code ?? err.message} on ${where}`, { uri: address.uri, cause: err }));
      });
      socket.once('connect', () => {
        clearTimeout(timer);
        this.abortOpen = undefined;
        socket.removeAllListeners('error');
        socket.setNoDelay(true);
        this.attach(socket as unknown as Stream);
        resolve();
      });
    });
  }

  private attach(stream: Stream): void {
    this.stream = stream;
    stream.on('data', this.onData);
    stream.on('error', this.onError);
    stream.on('close', this.onClose);
    stream.setTimeout(this.timeout, this.onTimeout);
  }

  private detach(): Stream {
    const stream = this.stream;
    stream.off('data', this.onData);
    stream.off('error', this.onError);
    stream.off('close', this.onClose);
    stream.setTimeout(0);
    return stream;
  }

  private async negotiate(tlsMaterial: { ca?: Buffer; cert?: Buffer; key?: Buffer } | undefined): Promise<void> {
    const uri = this.address.uri;
    const hello = await this.need(18);
    const magic = hello.readBigUInt64BE(0);
    const style = hello.readBigUInt64BE(8);
    if (magic !== NBDMAGIC) throw this.protocol(`does not start with the NBD magic (is it an NBD server?)`);
    if (style === CLISERV_MAGIC) throw this.protocol('speaks only the oldstyle negotiation, which is not supported');
    if (style !== IHAVEOPT) throw this.protocol('sent an unknown negotiation magic');
    const serverFlags = hello.readUInt16BE(16);
    if (!(serverFlags & FLAG_FIXED_NEWSTYLE)) throw this.protocol('does not offer fixed newstyle negotiation');
    const clientFlags = Buffer.alloc(4);
    clientFlags.writeUInt32BE(FLAG_FIXED_NEWSTYLE | (serverFlags & FLAG_NO_ZEROES));
    this.stream.write(clientFlags);

    if (tlsMaterial) {
      const replies = await this.option(OPT.STARTTLS, Buffer.alloc(0));
      const refusal = replies.find((r) => r.type & REP_ERROR_BIT);
      if (refusal) throw this.refused('refused TLS (NBD_OPT_STARTTLS)', refusal, 'Use nbd:// if the server does not offer TLS');
      if (this.queued > 0) throw this.protocol('sent bytes after accepting STARTTLS, before the TLS handshake');
      await this.startTls(tlsMaterial);
    }

    if (!this.options.noExtendedHeaders) {
      const [reply] = await this.option(OPT.EXTENDED_HEADERS, Buffer.alloc(0));
      if (reply!.type === REP.ACK) this.extendedHeaders = this.structuredReplies = true;
      else this.checkOptionalRefusal(reply!, 'NBD_OPT_EXTENDED_HEADERS');
    }
    if (!this.structuredReplies) {
      const [reply] = await this.option(OPT.STRUCTURED_REPLY, Buffer.alloc(0));
      if (reply!.type === REP.ACK) this.structuredReplies = true;
      else this.checkOptionalRefusal(reply!, 'NBD_OPT_STRUCTURED_REPLY');
    }

    const exportName = Buffer.from(this.address.exportName);
    const wanted = this.options.metaContexts ?? [];
    if (wanted.length > 0 && this.structuredReplies) {
      const queries = wanted.map((name) => Buffer.from(name));
      const body = Buffer.alloc(4 + exportName.length + 4 + queries.reduce((n, q) => n + 4 + q.length, 0));
      let at = body.writeUInt32BE(exportName.length, 0);
      at += exportName.copy(body, at);
      at = body.writeUInt32BE(queries.length, at);
      for (const q of queries) {
        at = body.writeUInt32BE(q.length, at);
        at += q.copy(body, at);
      }
      for (const reply of await this.option(OPT.SET_META_CONTEXT, body)) {
        if (reply.type & REP_ERROR_BIT) {
          throw this.refused('refused the meta contexts (NBD_OPT_SET_META_CONTEXT)', reply, reply.type === (REP_ERROR_BIT + 5) ? 'The server requires TLS: use nbds://' : undefined);
        }
        if (reply.type !== REP.META_CONTEXT) continue;
        if (reply.data.length < 5) throw this.protocol('sent a meta context reply too short to hold an id and a name');
        const id = reply.data.readUInt32BE(0);
        const name = reply.data.toString('utf8', 4);
        if (!wanted.includes(name)) throw this.protocol(`sent the meta context '${name}', which was not asked for`);
        this.contexts.set(name, id);
      }
    }
    for (const name of this.options.requiredContexts ?? []) {
      if (this.contexts.has(name)) continue;
      const bitmap = /^qemu:dirty-bitmap:(.*)$/.exec(name);
      const why = !this.structuredReplies ? ' (it offers no structured replies, hence no block status)' : '';
      throw new NbdServerError(
        bitmap ? `The NBD server at ${uri} does not publish the dirty bitmap '${bitmap[1]}' (meta context ${name})${why}` : `The NBD server at ${uri} does not publish the meta context ${name}${why}`,
        { uri, ...(bitmap ? { hint: `Serve it, e.g. qemu-nbd -B ${bitmap[1]} …, or libvirt backup-begin with an incremental checkpoint` } : {}) },
      );
    }

    // GO: the export, asking for block-size constraints.
    const go = Buffer.alloc(4 + exportName.length + 2 + 2);
    let at = go.writeUInt32BE(exportName.length, 0);
    at += exportName.copy(go, at);
    at = go.writeUInt16BE(1, at);
    go.writeUInt16BE(INFO_BLOCK_SIZE, at);
    let sawExport = false;
    for (const reply of await this.option(OPT.GO, go)) {
      if (reply.type & REP_ERROR_BIT) {
        const code = reply.type & ~REP_ERROR_BIT;
        const message = code === 6 ? `has no export named '${this.address.exportName}'` : 'refused the export (NBD_OPT_GO)';
        throw this.refused(message, reply, code === 5 ? 'The server requires TLS: use nbds:// with --tls-ca (API: nbd: { tls: { ca } })' : undefined);
      }
      if (reply.type !== REP.INFO) continue;
      if (reply.data.length < 2) throw this.protocol('sent an NBD_REP_INFO too short to hold its type');
      const info = reply.data.readUInt16BE(0);
      if (info === INFO_EXPORT) {
        if (reply.data.length !== 12) throw this.protocol('sent an NBD_INFO_EXPORT of the wrong length');
        const size = reply.data.readBigUInt64BE(2);
        if (size > BigInt(Number.MAX_SAFE_INTEGER)) throw this.protocol(`announced an export of ${size} bytes, beyond 2^53`);
        this.size = Number(size);
        this.flags = reply.data.readUInt16BE(10);
        sawExport = true;
      } else if (info === INFO_BLOCK_SIZE) {
        if (reply.data.length !== 14) throw this.protocol('sent an NBD_INFO_BLOCK_SIZE of the wrong length');
        const minimum = reply.data.readUInt32BE(2);
        const preferred = reply.data.readUInt32BE(6);
        const maximum = reply.data.readUInt32BE(10);
        const pow2 = (n: number) => n > 0 && (n & (n - 1)) === 0;
        // proto.md: minimum a power of two ≤ 64 KiB, preferred a power of two ≥ minimum, maximum a multiple of minimum.
        if (!pow2(minimum) || minimum > 65536 || !pow2(preferred) || preferred < minimum || maximum < minimum || maximum % minimum !== 0) {
          throw this.protocol(`sent impossible block-size constraints (minimum ${minimum}, preferred ${preferred}, maximum ${maximum})`);
        }
        this.blockSize = { minimum, preferred, maximum };
      }
    }
    if (!sawExport) throw this.protocol('accepted NBD_OPT_GO without describing the export (NBD_INFO_EXPORT)');
    if (this.size % this.blockSize.minimum !== 0) throw this.protocol(`announced a size of ${this.size} bytes, not a multiple of its minimum block size ${this.blockSize.minimum}`);
    if (this.queued > 0) throw this.protocol('sent bytes after NBD_OPT_GO before any request');
    this.negotiating = false;
  }

  private async startTls(material: { ca?: Buffer; cert?: Buffer; key?: Buffer }): Promise<void> {
    const tls = process.getBuiltinModule('node:tls');
    const raw = this.detach();
    const hostname = this.options.tls?.hostname ?? this.address.tlsHostname ?? (this.address.transport === 'unix' ? 'localhost' : this.address.host!);
    const net = process.getBuiltinModule('node:net');
    const secure = tls.connect({
      socket: raw as unknown as import('node:net').Socket,
      ...material,
      // SNI takes names only; the identity check below handles IP addresses too.
      ...(net.isIP(hostname) ? {} : { servername: hostname }),
      checkServerIdentity: (_host, cert) => tls.checkServerIdentity(hostname, cert),
    });
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => {
        secure.destroy();
        reject(new NbdConnectionError(`The TLS handshake with ${this.address.uri} did not finish in ${this.timeout / 1000} s`, { uri: this.address.uri }));
      }, this.timeout);
      secure.once('secureConnect', () => {
        clearTimeout(timer);
        secure.removeAllListeners('error');
        resolve();
      });
      secure.once('error', (err) => {
        clearTimeout(timer);
        reject(new NbdConnectionError(`The TLS handshake with ${this.address.uri} failed: ${err.message}`, { uri: this.address.uri, cause: err }));
      });
    });
    this.tls = true;
    this.attach(secure as unknown as Stream);
  }

  /** Sends an option and collects its replies up to the final one (ACK, or an error). */
  private async option(option: number, data: Buffer): Promise<Array<{ type: number; data: Buffer }>> {
    const head = Buffer.alloc(16);
    head.writeBigUInt64BE(IHAVEOPT, 0);
    head.writeUInt32BE(option, 8);
    head.writeUInt32BE(data.length, 12);
    this.stream.write(Buffer.concat([head, data]));
    const replies: Array<{ type: number; data: Buffer }> = [];
    for (;;) {
      const reply = await this.need(20);
      if (reply.readBigUInt64BE(0) !== OPTION_REPLY_MAGIC) throw this.protocol('sent an option reply with a bad magic');
      if (reply.readUInt32BE(8) !== option) throw this.protocol(`answered option ${reply.readUInt32BE(8)} when asked option ${option}`);
      const type = reply.readUInt32BE(12);
      const length = reply.readUInt32BE(16);
      if (length > MAX_OPTION_REPLY) throw this.protocol(`sent an option reply of ${length} bytes (the limit is ${MAX_OPTION_REPLY})`);
      replies.push({ type, data: length === 0 ? Buffer.alloc(0) : await this.need(length) });
      if (type === REP.ACK || type & REP_ERROR_BIT) return replies;
      if (replies.length > MAX_OPTION_REPLIES) throw this.protocol(`sent more than ${MAX_OPTION_REPLIES} replies to one option`);
    }
  }

  /** An option the server may refuse: UNSUP and POLICY mean "not here", anything else is wrong. */
  private checkOptionalRefusal(reply: { type: number; data: Buffer }, name: string): void {
    if (reply.type === (REP_ERROR_BIT + 1) || reply.type === (REP_ERROR_BIT + 2)) return;
    if (reply.type & REP_ERROR_BIT) throw this.refused(`refused ${name}`, reply, reply.type === (REP_ERROR_BIT + 5) ? 'The server requires TLS: use nbds:// with --tls-ca (API: nbd: { tls: { ca } })' : undefined);
    throw this.protocol(`answered ${name} with reply type ${reply.type}`);
  }

  /** The next `n` bytes of the negotiation. */
  private async need(n: number): Promise<Buffer> {
    while (this.queued < n) {
      if (this.failure) throw this.failure;
      await new Promise<void>((resolve) => (this.wakeReader = resolve));
    }
    if (this.failure) throw this.failure;
    const all = this.queue.length === 1 ? this.queue[0]! : Buffer.concat(this.queue);
    const out = Buffer.from(all.subarray(0, n));
    const rest = all.subarray(n);
    this.queue = rest.length > 0 ? [rest] : [];
    this.queued = rest.length;
    return out;
  }

  // ─── Transmission ──────────────────────────────────────────────────────────────────────────

  private checkRange(offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length <= 0 || offset + length > this.size) {
      throw new InvalidArgumentError(`NBD request [${offset}, +${length}) is outside the export (${this.size} bytes)`);
    }
    if (!this.extendedHeaders && length > 0xffff_ffff) throw new InvalidArgumentError(`NBD request of ${length} bytes needs extended headers`);
  }

  private encodeRequest(type: number, cookie: number, offset: number, length: number): Buffer {
    const ext = this.extendedHeaders;
    const buf = Buffer.alloc(ext ? 32 : 28);
    buf.writeUInt32BE(ext ? EXTENDED_REQUEST_MAGIC : REQUEST_MAGIC, 0);
    buf.writeUInt16BE(0, 4); // command flags
    buf.writeUInt16BE(type, 6);
    buf.writeUInt32BE(0, 8);
    buf.writeUInt32BE(cookie, 12);
    buf.writeBigUInt64BE(BigInt(offset), 16);
    if (ext) buf.writeBigUInt64BE(BigInt(length), 24);
    else buf.writeUInt32BE(length, 24);
    return buf;
  }

  private request(type: number, offset: number, length: number, extra: { target?: Uint8Array; targetOffset?: number }): Promise<unknown> {
    if (this.failure) return Promise.reject(this.failure);
    if (this.closing) return Promise.reject(new NbdConnectionError(`The NBD connection to ${this.address.uri} is closed`, { uri: this.address.uri }));
    return new Promise((resolve, reject) => {
      const cookie = this.nextCookie;
      this.nextCookie = this.nextCookie >= 0xffff_fff0 ? 1 : this.nextCookie + 1;
      const entry: Pending = {
        cookie,
        type,
        offset,
        length,
        targetOffset: extra.targetOffset ?? 0,
        covered: [],
        holes: [],
        statuses: new Map(),
        resolve,
        reject,
      };
      if (extra.target) entry.target = extra.target;
      if (type === CMD.READ) this.pendingReadBytes += length;
      // Past MAX_IN_FLIGHT (a server with a small maximum block size splits a 2 MiB read into
      // many), requests wait here and go out as earlier ones complete.
      if (this.pending.size >= MAX_IN_FLIGHT) this.waiting.push(entry);
      else this.send(entry);
    });
  }

  private send(entry: Pending): void {
    this.pending.set(entry.cookie, entry);
    this.stream.write(this.encodeRequest(entry.type, entry.cookie, entry.offset, entry.length));
  }

  /**
   * The socket's next read buffer (called after every read): the rest of the payload being
   * received, in place in its target, when enough of it is left — so data lands where it
   * belongs without a copy, in reads as large as the kernel has bytes for — else the scratch
   * buffer. The view is within the target range claim() checked, so a server cannot make the
   * socket write anywhere else.
   */
  private nextReadBuffer(): Uint8Array {
    if (this.state === 'data' && this.dataLeft >= DIRECT_MIN && !this.failure && !this.closing) {
      this.direct = this.current!.target!.subarray(this.dataAt, this.dataAt + this.dataLeft);
      return this.direct;
    }
    this.direct = undefined;
    return this.scratch;
  }

  /** `onread`'s callback: `nread` bytes arrived in `buffer`, the last one nextReadBuffer gave. */
  private onRead(nread: number, buffer: Uint8Array): boolean {
    if (buffer !== this.direct) {
      this.receive(this.scratch.subarray(0, nread), true);
      return true;
    }
    this.direct = undefined;
    if (this.failure || this.closing) return true;
    this.dataAt += nread;
    this.dataLeft -= nread;
    this.stats.dataBytes += nread;
    if (this.dataLeft === 0) {
      try {
        this.endChunk();
      } catch (err) {
        this.fail(err instanceof Qcow2StreamError ? err : this.protocol(String(err)));
      }
    }
    return true;
  }

  /** Bytes from the socket; `reused` when `chunk` is the scratch buffer, which the next read overwrites. */
  private receive(chunk: Buffer, reused: boolean): void {
    if (this.failure || this.closing) return;
    if (this.negotiating) {
      this.queue.push(reused ? Buffer.from(chunk) : chunk);
      this.queued += chunk.length;
      if (this.queued > MAX_OPTION_REPLY + 64 && this.queue.length > 1) {
        // Flattened so need() never concatenates an unbounded list; a flood fails at the bound.
        this.queue = [Buffer.concat(this.queue)];
      }
      const wake = this.wakeReader;
      this.wakeReader = undefined;
      wake?.();
      return;
    }
    try {
      this.parse(chunk);
    } catch (err) {
      this.fail(err instanceof Qcow2StreamError ? err : this.protocol(String(err)));
    }
  }

  /** The reply state machine: headers into a fixed buffer, read payloads straight into their target. */
  private parse(chunk: Buffer): void {
    let at = 0;
    while (at < chunk.length) {
      if (this.failure) return;
      if (this.state === 'header') {
        const take = Math.min(this.headerNeed - this.headerHave, chunk.length - at);
        chunk.copy(this.header, this.headerHave, at, at + take);
        this.headerHave += take;
        at += take;
        if (this.headerHave < this.headerNeed) continue;
        if (this.headerNeed === 4) {
          const magic = this.header.readUInt32BE(0);
          if (magic === SIMPLE_REPLY_MAGIC && !this.extendedHeaders) this.headerNeed = 16;
          else if (magic === STRUCTURED_REPLY_MAGIC && this.structuredReplies && !this.extendedHeaders) this.headerNeed = 20;
          else if (magic === EXTENDED_REPLY_MAGIC && this.extendedHeaders) this.headerNeed = 32;
          else throw this.protocol(`sent a reply with a bad magic 0x${magic.toString(16).padStart(8, '0')}`);
          continue;
        }
        this.onHeader();
      } else if (this.state === 'data') {
        const take = Math.min(this.dataLeft, chunk.length - at);
        const req = this.current!;
        req.target!.set(chunk.subarray(at, at + take), this.dataAt);
        this.dataAt += take;
        this.dataLeft -= take;
        this.stats.dataBytes += take;
        at += take;
        if (this.dataLeft === 0) this.endChunk();
      } else {
        const take = Math.min(this.payload!.length - this.payloadHave, chunk.length - at);
        chunk.copy(this.payload!, this.payloadHave, at, at + take);
        this.payloadHave += take;
        at += take;
        if (this.payloadHave === this.payload!.length) this.onPayload();
      }
    }
  }

  private onHeader(): void {
    const h = this.header;
    const magic = h.readUInt32BE(0);
    const cookie = h.readUInt32BE(8) === 0 ? h.readUInt32BE(12) : -1;
    const req = this.pending.get(cookie);
    if (!req) throw this.protocol(`answered a request that is not pending (cookie 0x${h.readUInt32BE(8).toString(16)}${h.readUInt32BE(12).toString(16).padStart(8, '0')})`);
    this.current = req;
    this.headerHave = 0;
    this.headerNeed = 4;
    if (magic === SIMPLE_REPLY_MAGIC) {
      const error = h.readUInt32BE(4);
      this.chunkFlags = REPLY_FLAG_DONE;
      this.chunkType = CHUNK.NONE;
      if (error !== 0) {
        req.failure ??= this.serverError(error, '', req);
        return this.endChunk();
      }
      if (req.type === CMD.READ) {
        if (this.structuredReplies) throw this.protocol('sent a simple reply to a read after agreeing to structured replies');
        req.covered.push([0, req.length]);
        return this.startData(req.targetOffset, req.length);
      }
      if (req.type === CMD.BLOCK_STATUS) throw this.protocol('sent a simple reply to BLOCK_STATUS');
      return this.endChunk();
    }
    this.chunkFlags = h.readUInt16BE(4);
    this.chunkType = h.readUInt16BE(6);
    let length: number;
    if (magic === EXTENDED_REPLY_MAGIC) {
      const big = h.readBigUInt64BE(24);
      if (big > BigInt(MAX_READ_REQUEST) + 16n) throw this.protocol(`sent a reply chunk of ${big} bytes`);
      length = Number(big);
    } else {
      length = h.readUInt32BE(16);
    }
    this.chunkLength = length;
    const type = this.chunkType;
    if (type === CHUNK.NONE) {
      if (length !== 0) throw this.protocol('sent an NBD_REPLY_TYPE_NONE chunk with a payload');
      if (!(this.chunkFlags & REPLY_FLAG_DONE)) throw this.protocol('sent an NBD_REPLY_TYPE_NONE chunk without the DONE flag');
      return this.endChunk();
    }
    if (type === CHUNK.OFFSET_DATA) {
      if (req.type !== CMD.READ) throw this.protocol('sent data in reply to a request that is not a read');
      if (length <= 8 || length - 8 > req.length) throw this.protocol(`sent a data chunk of ${length} bytes for a read of ${req.length}`);
      return this.startPayload(8);
    }
    if (type === CHUNK.OFFSET_HOLE) {
      if (req.type !== CMD.READ) throw this.protocol('sent a hole in reply to a request that is not a read');
      if (length !== (this.extendedHeaders ? 16 : 12)) throw this.protocol(`sent a hole chunk of ${length} bytes`);
      return this.startPayload(length);
    }
    if (type === CHUNK.BLOCK_STATUS || type === CHUNK.BLOCK_STATUS_EXT) {
      if (req.type !== CMD.BLOCK_STATUS) throw this.protocol('sent block status in reply to a request that is not BLOCK_STATUS');
      const ext = type === CHUNK.BLOCK_STATUS_EXT;
      if (ext !== this.extendedHeaders) throw this.protocol(`sent ${ext ? 'extended' : '32-bit'} block status on a connection that ${this.extendedHeaders ? 'has' : 'lacks'} extended headers`);
      const head = ext ? 8 : 4;
      const entry = ext ? 16 : 8;
      if (length < head + entry || (length - head) % entry !== 0 || length > MAX_CHUNK_PAYLOAD) {
        throw this.protocol(`sent a block status chunk of ${length} bytes`);
      }
      return this.startPayload(length);
    }
    if (type & CHUNK_ERROR_BIT) {
      if (length < 6 || length > 6 + 4096 + 8) throw this.protocol(`sent an error chunk of ${length} bytes`);
      return this.startPayload(length);
    }
    throw this.protocol(`sent an unknown reply chunk type ${type}`);
  }

  private startPayload(length: number): void {
    this.payload = Buffer.allocUnsafe(length);
    this.payloadHave = 0;
    this.state = 'payload';
  }

  private startData(targetAt: number, length: number): void {
    this.state = 'data';
    this.dataAt = targetAt;
    this.dataLeft = length;
    if (length === 0) this.endChunk();
  }

  private onPayload(): void {
    const req = this.current!;
    const p = this.payload!;
    this.payload = undefined;
    const type = this.chunkType;
    if (type === CHUNK.OFFSET_DATA) {
      const offset = this.u64(p, 0, 'data chunk offset');
      const length = this.chunkLength - 8;
      const rel = this.claim(req, offset, length, 'data');
      return this.startData(req.targetOffset + rel, length);
    }
    if (type === CHUNK.OFFSET_HOLE) {
      const offset = this.u64(p, 0, 'hole offset');
      const length = this.extendedHeaders ? this.u64(p, 8, 'hole length') : p.readUInt32BE(8);
      if (length === 0) throw this.protocol('sent a hole of 0 bytes');
      const rel = this.claim(req, offset, length, 'hole');
      req.holes.push([rel, rel + length]);
      this.stats.holeBytes += length;
      return this.endChunk();
    }
    if (type === CHUNK.BLOCK_STATUS || type === CHUNK.BLOCK_STATUS_EXT) {
      const ext = type === CHUNK.BLOCK_STATUS_EXT;
      const id = p.readUInt32BE(0);
      if (![...this.contexts.values()].includes(id)) throw this.protocol(`sent block status for meta context ${id}, which was not negotiated`);
      if (req.statuses.has(id)) throw this.protocol(`sent block status for meta context ${id} twice in one reply`);
      const entry = ext ? 16 : 8;
      const head = ext ? 8 : 4;
      const count = (p.length - head) / entry;
      if (ext && p.readUInt32BE(4) !== count) throw this.protocol('sent an extended block status whose count disagrees with its length');
      const extents: NbdExtent[] = [];
      let offset = req.offset;
      const end = req.offset + req.length;
      for (let i = 0; i < count && offset < end; i++) {
        const at = head + i * entry;
        const length = ext ? this.u64(p, at, 'extent length') : p.readUInt32BE(at);
        const flags = ext ? this.u64(p, at + 8, 'extent flags') : p.readUInt32BE(at + 4);
        if (length === 0) throw this.protocol('sent a block status extent of 0 bytes');
        // The last extent may run past the request; we only keep what was asked about.
        const kept = Math.min(length, end - offset);
        extents.push({ offset, length: kept, flags });
        offset += kept;
      }
      req.statuses.set(id, extents);
      return this.endChunk();
    }
    // An error chunk: u32 error, u16 message length, message [, u64 offset].
    const error = p.readUInt32BE(0);
    const messageLength = p.readUInt16BE(4);
    const extra = type === CHUNK.ERROR_OFFSET ? 8 : 0;
    if (6 + messageLength + extra !== p.length) throw this.protocol('sent an error chunk whose message length disagrees with its size');
    if (error === 0) throw this.protocol('sent an error chunk with error 0');
    const message = p.toString('utf8', 6, 6 + messageLength);
    req.failure ??= this.serverError(error, message, req);
    return this.endChunk();
  }

  /** Checks a data or hole chunk lies within its read and overlaps nothing seen; returns its offset in the read. */
  private claim(req: Pending, offset: number, length: number, what: string): number {
    if (offset < req.offset || offset + length > req.offset + req.length) {
      throw this.protocol(`sent a ${what} chunk [${offset}, +${length}) outside the read [${req.offset}, +${req.length})`);
    }
    const rel = offset - req.offset;
    for (const [s, e] of req.covered) if (rel < e && rel + length > s) throw this.protocol(`sent overlapping ${what} chunks for one read`);
    req.covered.push([rel, rel + length]);
    return rel;
  }

  private endChunk(): void {
    this.state = 'header';
    const req = this.current!;
    if (!(this.chunkFlags & REPLY_FLAG_DONE)) return;
    this.current = undefined;
    this.pending.delete(req.cookie);
    if (req.type === CMD.READ) this.pendingReadBytes -= req.length;
    const next = this.waiting.shift();
    if (next) this.send(next);
    if (req.failure) return req.reject(req.failure);
    if (req.type === CMD.READ) {
      const covered = req.covered.reduce((n, [s, e]) => n + (e - s), 0);
      if (covered !== req.length) return this.failWith(req, this.protocol(`answered a read of ${req.length} bytes with ${covered}`));
      return req.resolve({ holes: req.holes } satisfies NbdReadResult);
    }
    if (req.type === CMD.BLOCK_STATUS) {
      for (const id of this.contexts.values()) {
        if (!req.statuses.has(id)) return this.failWith(req, this.protocol(`answered BLOCK_STATUS without extents for meta context ${id}`));
      }
      return req.resolve(req.statuses);
    }
    req.resolve(undefined);
  }

  private u64(buf: Buffer, at: number, what: string): number {
    const value = buf.readBigUInt64BE(at);
    if (value > BigInt(Number.MAX_SAFE_INTEGER)) throw this.protocol(`sent a ${what} of ${value}, beyond 2^53`);
    return Number(value);
  }

  // ─── Failures ──────────────────────────────────────────────────────────────────────────────

  private protocol(what: string): NbdProtocolError {
    return new NbdProtocolError(`The NBD server at ${this.address.uri} ${what}`, { uri: this.address.uri });
  }

  private refused(what: string, reply: { type: number; data: Buffer }, hint?: string): NbdServerError {
    const errno = REP_ERRORS[reply.type & ~REP_ERROR_BIT] ?? `NBD_REP_ERR ${reply.type & ~REP_ERROR_BIT}`;
    // The optional text is the server's; only printable characters of it reach a terminal.
    const text = reply.data.toString('utf8', 0, Math.min(reply.data.length, 512)).replace(/[^\x20-\x7e]/g, ' ').trim();
    return new NbdServerError(`The NBD server at ${this.address.uri} ${what}: ${errno}${text ? ` (${text})` : ''}`, {
      uri: this.address.uri,
      errno,
      ...(hint === undefined ? {} : { hint }),
    });
  }

  private serverError(error: number, message: string, req: Pending): NbdServerError {
    const errno = NBD_ERRORS[error] ?? `error ${error}`;
    const what = req.type === CMD.READ ? `read [${req.offset}, +${req.length})` : `block status [${req.offset}, +${req.length})`;
    const text = message.replace(/[^\x20-\x7e]/g, ' ').trim().slice(0, 200);
    return new NbdServerError(`The NBD server at ${this.address.uri} failed a ${what}: ${errno}${text ? ` (${text})` : ''}`, { uri: this.address.uri, errno });
  }

  /** Fails the connection and `req`, which is no longer pending. */
  private failWith(req: Pending, error: Qcow2StreamError): void {
    req.reject(error);
    this.fail(error);
  }

  /** Fails the connection: every pending and later request rejects with `error`. */
  private fail(error: Qcow2StreamError): void {
    if (this.failure) return;
    this.failure = error;
    this.failAll(error);
    const wake = this.wakeReader;
    this.wakeReader = undefined;
    wake?.();
    this.stream?.destroy();
  }

  private failAll(error: Qcow2StreamError): void {
    const pending = [...this.pending.values(), ...this.waiting.splice(0)];
    this.pending.clear();
    this.pendingReadBytes = 0;
    for (const req of pending) req.reject(error);
  }
}
