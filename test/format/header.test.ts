import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import {
  AUTOCLEAR_BITMAPS,
  AUTOCLEAR_DATA_FILE_RAW,
  COMPAT_LAZY_REFCOUNTS,
  decodeExtensions,
  decodeHeaderFields,
  encodeFeatureTable,
  encodeHeaderCluster,
  EXT_BACKING_FORMAT,
  EXT_CRYPTO_HEADER,
  EXT_DATA_FILE,
  EXT_FEATURE_TABLE,
  HEADER_FIELDS,
  HEADER_PROBE_SIZE,
  INCOMPAT_COMPRESSION,
  INCOMPAT_DATA_FILE,
  INCOMPAT_DIRTY,
  INCOMPAT_EXTL2,
  parseHeader,
  QCOW2_MAGIC,
  QEMU_FEATURE_TABLE,
  type HeaderSpec,
  type ParsedHeader,
} from '../../src/format/index.js';
import {
  BadMagicError,
  CorruptImageError,
  InvalidArgumentError,
  LimitExceededError,
  UnsupportedFeatureError,
  UnsupportedVersionError,
  type ErrorCode,
} from '../../src/errors.js';
import {
  ascii,
  assertQcowError,
  atOffset,
  craftCluster0,
  hexToBytes,
  MiB,
  PiB,
  QEMU_4M_FIELDS,
  toHex,
  type CraftOptions,
} from './helpers.js';

/** Cluster 0 of digest §2.2 (qemu-img convert -o data_file=conv.data,data_file_raw=on), bytes 0–0x8f. */
const QEMU_DUMP_0_TO_0x90 = hexToBytes(`
  5146 49fb 0000 0003 0000 0000 0000 0000
  0000 0000 0000 0010 0000 0000 0040 0000
  0000 0000 0000 0001 0000 0000 0003 0000
  0000 0000 0001 0000 0000 0001 0000 0000
  0000 0000 0000 0000 0000 0000 0000 0004
  0000 0000 0000 0000 0000 0000 0000 0002
  0000 0004 0000 0070 0000 0000 0000 0000
  4441 5441 0000 0009 636f 6e76 2e64 6174
  6100 0000 0000 0000 6803 f857 0000 0180
`);

/** The first 112 bytes of `qemu-img create -f qcow2 -o compat=0.10 -b base.raw -F raw v2.qcow2 1M`. */
const QEMU_V2_BACKING_HEADER = hexToBytes(`
  514649fb0000000200000000000000600000000800000010000000000010
  000000000000000000010000000000030000000000000001000000000001
  000000000000000000000000e2792aca0000000372617700000000000000
  000000000000626173652e7261770000000000000000
`);

const RAW_DATA_FILE_SPEC: HeaderSpec = {
  clusterBits: 16,
  size: 4 * MiB,
  l1Size: 1,
  l1TableOffset: 0x30000,
  refcountTableOffset: 0x10000,
  refcountTableClusters: 1,
  refcountOrder: 4,
  incompatibleFeatures: INCOMPAT_DATA_FILE,
  autoclearFeatures: AUTOCLEAR_DATA_FILE_RAW,
  dataFileName: 'conv.data',
};

function parseCrafted(options: CraftOptions): ParsedHeader {
  return parseHeader(craftCluster0(options));
}

// ---------------------------------------------------------------------------------------------

describe('HEADER_FIELDS', () => {
  test('declares every v3 field at the spec offset with the spec width, without overlaps', () => {
    const expected: [string, number, number][] = [
      ['magic', 0, 4], ['version', 4, 4], ['backing_file_offset', 8, 8], ['backing_file_size', 16, 4],
      ['cluster_bits', 20, 4], ['size', 24, 8], ['crypt_method', 32, 4], ['l1_size', 36, 4],
      ['l1_table_offset', 40, 8], ['refcount_table_offset', 48, 8], ['refcount_table_clusters', 56, 4],
      ['nb_snapshots', 60, 4], ['snapshots_offset', 64, 8], ['incompatible_features', 72, 8],
      ['compatible_features', 80, 8], ['autoclear_features', 88, 8], ['refcount_order', 96, 4],
      ['header_length', 100, 4], ['compression_type', 104, 1],
    ];
    const width = { u8: 1, u32: 4, u64: 8, bits64: 8 } as const;
    assert.deepEqual(
      HEADER_FIELDS.map((f) => [f.specName, f.offset, width[f.kind]]),
      expected,
    );
    assert.equal(HEADER_PROBE_SIZE, 112);
  });
});

describe('encodeHeaderCluster → parseHeader round trip', () => {
  const cases: { name: string; spec: HeaderSpec; featureTable: boolean }[] = [
    { name: '64 KiB clusters, raw data file (qemu default)', spec: RAW_DATA_FILE_SPEC, featureTable: true },
    {
      name: '512 B clusters, data file, no feature table',
      spec: { ...RAW_DATA_FILE_SPEC, clusterBits: 9, size: 10 * MiB, l1Size: 320, l1TableOffset: 3 * 512, refcountTableOffset: 512, dataFileName: 'd' },
      featureTable: false,
    },
    {
      name: '4 KiB clusters: still no feature table (qemu writes it only above 4096)',
      spec: { ...RAW_DATA_FILE_SPEC, clusterBits: 12, l1TableOffset: 3 * 4096, refcountTableOffset: 4096 },
      featureTable: false,
    },
    {
      name: '8 KiB clusters: feature table present',
      spec: { ...RAW_DATA_FILE_SPEC, clusterBits: 13, l1TableOffset: 3 * 8192, refcountTableOffset: 8192 },
      featureTable: true,
    },
    {
      name: '2 MiB clusters, backing file + format + data file, lazy refcounts',
      spec: {
        clusterBits: 21,
        size: 3 * 1024 * MiB,
        l1Size: 1,
        l1TableOffset: 3 * 2 * MiB,
        refcountTableOffset: 2 * MiB,
        refcountTableClusters: 1,
        refcountOrder: 4,
        incompatibleFeatures: INCOMPAT_DATA_FILE,
        compatibleFeatures: COMPAT_LAZY_REFCOUNTS,
        autoclearFeatures: 0n,
        dataFileName: 'sub dir/disk.data',
        backingFileName: '../base images/base.qcow2',
        backingFormat: 'qcow2',
      },
      featureTable: true,
    },
    {
      name: 'backing file without a data file',
      spec: {
        clusterBits: 16, size: 1 * MiB, l1Size: 1, l1TableOffset: 0x30000, refcountTableOffset: 0x10000,
        refcountTableClusters: 1, refcountOrder: 4, incompatibleFeatures: 0n, autoclearFeatures: 0n,
        backingFileName: 'base.raw', backingFormat: 'raw',
      },
      featureTable: true,
    },
    {
      name: 'extended L2 at 16 KiB clusters, refcount_order 0',
      spec: {
        ...RAW_DATA_FILE_SPEC, clusterBits: 14, refcountOrder: 0, l1TableOffset: 3 * 16384, refcountTableOffset: 16384,
        incompatibleFeatures: INCOMPAT_DATA_FILE | INCOMPAT_EXTL2,
      },
      featureTable: true,
    },
    {
      name: 'refcount_order 6, several refcount table clusters, bitmaps autoclear bit',
      spec: {
        ...RAW_DATA_FILE_SPEC, refcountOrder: 6, refcountTableClusters: 3, l1TableOffset: 0x50000,
        autoclearFeatures: AUTOCLEAR_DATA_FILE_RAW | AUTOCLEAR_BITMAPS,
      },
      featureTable: true,
    },
    {
      name: 'feature table forced on at 512 B clusters (exactly fills cluster 0)',
      spec: {
        clusterBits: 9, size: 512, l1Size: 1, l1TableOffset: 1536, refcountTableOffset: 512, refcountTableClusters: 1,
        refcountOrder: 4, incompatibleFeatures: 0n, autoclearFeatures: 0n, featureTable: true,
      },
      featureTable: true,
    },
    {
      name: 'feature table forced off at 64 KiB clusters',
      spec: { ...RAW_DATA_FILE_SPEC, featureTable: false },
      featureTable: false,
    },
    {
      name: 'non-ASCII data-file name',
      spec: { ...RAW_DATA_FILE_SPEC, dataFileName: 'dätä-ディスク.raw' },
      featureTable: true,
    },
    {
      name: '2 PiB virtual size (the L1 limit at 64 KiB clusters)',
      spec: { ...RAW_DATA_FILE_SPEC, size: 2 * PiB, l1Size: 4194304, l1TableOffset: 0x30000 },
      featureTable: true,
    },
    {
      name: 'largest safe virtual size at 2 MiB clusters',
      spec: { ...RAW_DATA_FILE_SPEC, clusterBits: 21, size: Number.MAX_SAFE_INTEGER - 511, l1Size: 2 ** 20, l1TableOffset: 6 * MiB, refcountTableOffset: 2 * MiB },
      featureTable: true,
    },
  ];

  for (const { name, spec, featureTable } of cases) {
    test(name, () => {
      const cluster0 = encodeHeaderCluster(spec);
      assert.equal(cluster0.length, 2 ** spec.clusterBits, 'cluster 0 is exactly one cluster');
      const h = parseHeader(cluster0);

      assert.equal(h.magic, QCOW2_MAGIC);
      assert.equal(h.version, 3);
      assert.equal(h.headerLength, 112);
      assert.equal(h.compressionType, 0);
      assert.equal(h.cryptMethod, 0);
      assert.equal(h.nbSnapshots, 0);
      assert.equal(h.snapshotsOffset, 0);
      assert.equal(h.clusterBits, spec.clusterBits);
      assert.equal(h.clusterSize, 2 ** spec.clusterBits);
      assert.equal(h.size, spec.size);
      assert.equal(h.l1Size, spec.l1Size);
      assert.equal(h.l1TableOffset, spec.l1TableOffset);
      assert.equal(h.refcountTableOffset, spec.refcountTableOffset);
      assert.equal(h.refcountTableClusters, spec.refcountTableClusters);
      assert.equal(h.refcountOrder, spec.refcountOrder);
      assert.equal(h.incompatibleFeatures, spec.incompatibleFeatures);
      assert.equal(h.compatibleFeatures, spec.compatibleFeatures ?? 0n);
      assert.equal(h.autoclearFeatures, spec.autoclearFeatures);
      assert.equal(h.dataFileName, spec.dataFileName);
      assert.equal(h.backingFileName, spec.backingFileName);
      assert.equal(h.backingFormat, spec.backingFormat);
      assert.equal(h.unknownHeaderBytes.length, 0);

      // qemu's extension order: backing format, data file, feature table
      const expectedTypes = [
        ...(spec.backingFormat !== undefined ? [EXT_BACKING_FORMAT] : []),
        ...(spec.dataFileName !== undefined ? [EXT_DATA_FILE] : []),
        ...(featureTable ? [EXT_FEATURE_TABLE] : []),
      ];
      assert.deepEqual(h.extensions.map((e) => e.type), expectedTypes);
      assert.deepEqual(h.featureNames, featureTable ? [...QEMU_FEATURE_TABLE] : []);

      // the backing name sits right after END; without one, the offset and size are 0
      const framed = h.extensions.reduce((n, e) => n + 8 + Math.ceil(e.data.length / 8) * 8, 0);
      if (spec.backingFileName === undefined) {
        assert.equal(h.backingFileOffset, 0);
        assert.equal(h.backingFileSize, 0);
      } else {
        assert.equal(h.backingFileOffset, 112 + framed + 8);
        assert.equal(h.backingFileSize, ascii(spec.backingFileName).length);
      }
      // nothing after the last structure
      const usedEnd = 112 + framed + 8 + h.backingFileSize;
      assert.ok(cluster0.subarray(usedEnd).every((b) => b === 0), 'the rest of cluster 0 is zero');
    });
  }

  test('backing + data file image: backing fmt @112, DATA @128, feature table @144, END @536, name @544 (digest §2.2)', () => {
    const cluster0 = encodeHeaderCluster({
      ...RAW_DATA_FILE_SPEC,
      autoclearFeatures: 0n,
      dataFileName: 'b.data',
      backingFileName: 'base.qcow2',
      backingFormat: 'qcow2',
    });
    const view = new DataView(cluster0.buffer);
    assert.equal(view.getUint32(112), EXT_BACKING_FORMAT);
    assert.equal(view.getUint32(116), 5);
    assert.equal(view.getUint32(128), EXT_DATA_FILE);
    assert.equal(view.getUint32(132), 6);
    assert.equal(view.getUint32(144), EXT_FEATURE_TABLE);
    assert.equal(view.getUint32(148), 384);
    assert.equal(view.getBigUint64(536), 0n, 'END frame');
    assert.equal(Number(view.getBigUint64(8)), 544, 'backing_file_offset');
    assert.equal(view.getUint32(16), 10, 'backing_file_size');
    assert.equal(new TextDecoder().decode(cluster0.subarray(544, 554)), 'base.qcow2');
  });

  test('a data-file name without the data-file incompatible bit is ignored, like qemu', () => {
    const h = parseHeader(encodeHeaderCluster({ ...RAW_DATA_FILE_SPEC, incompatibleFeatures: 0n, autoclearFeatures: 0n }));
    assert.equal(h.dataFileName, undefined);
    assert.ok(h.extensions.some((e) => e.type === EXT_DATA_FILE), 'the extension itself is still kept');
  });

  test('an empty backing file name round-trips as the empty string', () => {
    const h = parseHeader(encodeHeaderCluster({ ...RAW_DATA_FILE_SPEC, autoclearFeatures: 0n, backingFileName: '' }));
    assert.equal(h.backingFileName, '');
    assert.equal(h.backingFileSize, 0);
  });

  test('a 1023-byte backing file name is accepted; 1024 bytes is refused with InvalidArgumentError', () => {
    const name1023 = 'b'.repeat(1023);
    const h = parseHeader(encodeHeaderCluster({ ...RAW_DATA_FILE_SPEC, autoclearFeatures: 0n, backingFileName: name1023 }));
    assert.equal(h.backingFileName, name1023);
    const err = assertQcowError(
      () => encodeHeaderCluster({ ...RAW_DATA_FILE_SPEC, autoclearFeatures: 0n, backingFileName: 'b'.repeat(1024) }),
      { code: 'QCOW_ERR_INVALID_ARGUMENT', message: /1024 bytes.*1023/ },
    );
    assert.ok(err instanceof InvalidArgumentError);
    // the limit counts UTF-8 bytes, not UTF-16 code units: 512 × 'é' is 1024 bytes
    assertQcowError(
      () => encodeHeaderCluster({ ...RAW_DATA_FILE_SPEC, autoclearFeatures: 0n, backingFileName: 'é'.repeat(512) }),
      { code: 'QCOW_ERR_INVALID_ARGUMENT' },
    );
  });

  test('names that do not fit in cluster 0 are refused with InvalidArgumentError', () => {
    // 512 B cluster: 112 + feature table (392) + END (8) = 512; any data-file name overflows
    assertQcowError(
      () => encodeHeaderCluster({ ...RAW_DATA_FILE_SPEC, clusterBits: 9, featureTable: true, dataFileName: 'x' }),
      { code: 'QCOW_ERR_INVALID_ARGUMENT', message: /528 bytes but a cluster holds 512/ },
    );
    // without the table: 112 + 8 + 376 + 8 = 504 + 8-byte backing name = 512 fits; one more byte does not
    const fits = encodeHeaderCluster({ ...RAW_DATA_FILE_SPEC, clusterBits: 9, autoclearFeatures: 0n, dataFileName: 'd'.repeat(376), backingFileName: 'b'.repeat(8) });
    assert.equal(parseHeader(fits).backingFileName, 'b'.repeat(8));
    assertQcowError(
      () => encodeHeaderCluster({ ...RAW_DATA_FILE_SPEC, clusterBits: 9, autoclearFeatures: 0n, dataFileName: 'd'.repeat(376), backingFileName: 'b'.repeat(9) }),
      { code: 'QCOW_ERR_INVALID_ARGUMENT' },
    );
  });
});

describe('encodeHeaderCluster reproduces qemu bytes (digest §2.2)', () => {
  const cluster0 = encodeHeaderCluster(RAW_DATA_FILE_SPEC);

  test('bytes 0x00–0x8f equal the qemu dump: fixed fields, DATA extension, feature-table frame', () => {
    assert.equal(toHex(cluster0.subarray(0, 0x90)), toHex(QEMU_DUMP_0_TO_0x90));
  });

  test('field by field: incompat 0x4, autoclear 0x2, header_length 112, DATA at 112 with len 9', () => {
    const view = new DataView(cluster0.buffer);
    assert.equal(view.getUint32(0), 0x514649fb);
    assert.equal(view.getBigUint64(72), 0x4n);
    assert.equal(view.getBigUint64(80), 0n);
    assert.equal(view.getBigUint64(88), 0x2n);
    assert.equal(view.getUint32(96), 4);
    assert.equal(view.getUint32(100), 112);
    assert.deepEqual([...cluster0.subarray(104, 112)], [0, 0, 0, 0, 0, 0, 0, 0], 'compression_type 0 + 7 bytes of padding');
    assert.equal(view.getUint32(112), 0x44415441);
    assert.equal(view.getUint32(116), 9);
    assert.equal(new TextDecoder().decode(cluster0.subarray(120, 129)), 'conv.data');
    assert.deepEqual([...cluster0.subarray(129, 136)], [0, 0, 0, 0, 0, 0, 0], 'padding to 8 bytes');
    assert.equal(view.getUint32(136), 0x6803f857);
    assert.equal(view.getUint32(140), 384);
  });

  test('the feature table holds qemu\'s 8 entries in qemu\'s order, each 48 bytes', () => {
    const expected: [number, number, string][] = [
      [0, 0, 'dirty bit'], [0, 1, 'corrupt bit'], [0, 2, 'external data file'], [0, 3, 'compression type'],
      [0, 4, 'extended L2 entries'], [1, 0, 'lazy refcounts'], [2, 0, 'bitmaps'], [2, 1, 'raw external data'],
    ];
    expected.forEach(([kind, bit, name], i) => {
      const entry = cluster0.subarray(144 + i * 48, 144 + (i + 1) * 48);
      assert.equal(entry[0], kind, `entry ${i} kind`);
      assert.equal(entry[1], bit, `entry ${i} bit`);
      const nameBytes = ascii(name);
      assert.deepEqual([...entry.subarray(2, 2 + nameBytes.length)], [...nameBytes], `entry ${i} name`);
      assert.ok(entry.subarray(2 + nameBytes.length).every((b) => b === 0), `entry ${i} zero padding`);
    });
  });

  test('END at 528 and zeros to the end of the cluster', () => {
    assert.ok(cluster0.subarray(528).every((b) => b === 0));
    assert.deepEqual(decodeExtensions(cluster0, 112, cluster0.length).map((e) => [e.type, e.data.length]), [
      [EXT_DATA_FILE, 9],
      [EXT_FEATURE_TABLE, 384],
    ]);
  });

  test('encodeFeatureTable truncates names to 46 bytes and writes numeric kinds as given', () => {
    const table = encodeFeatureTable([
      { kind: 'autoclear', bit: 63, name: 'n'.repeat(60) },
      { kind: 7, bit: 3, name: 'odd kind' },
    ]);
    assert.equal(table.length, 96);
    assert.equal(table[0], 2);
    assert.equal(table[1], 63);
    assert.ok(table.subarray(2, 48).every((b) => b === 0x6e), 'all 46 name bytes used, no NUL');
    assert.equal(table[48], 7);
    // decoded back through parseHeader: a 46-byte name has no NUL and is read whole
    const cluster0 = craftCluster0({ extensions: [{ type: EXT_FEATURE_TABLE, data: table }] });
    const h = parseHeader(cluster0);
    assert.deepEqual(h.featureNames, [
      { kind: 'autoclear', bit: 63, name: 'n'.repeat(46) },
      { kind: 7, bit: 3, name: 'odd kind' },
    ]);
  });
});

describe('decodeHeaderFields / parseHeader on views with a non-zero byteOffset', () => {
  const specs: [string, HeaderSpec][] = [
    ['raw data file', RAW_DATA_FILE_SPEC],
    ['backing file, 2 MiB clusters', {
      ...RAW_DATA_FILE_SPEC, clusterBits: 21, autoclearFeatures: 0n, backingFileName: 'base.img', backingFormat: 'raw',
      size: 2 ** 40 + 512, l1Size: 2, compatibleFeatures: COMPAT_LAZY_REFCOUNTS,
    }],
  ];
  for (const [name, spec] of specs) {
    test(`${name}: the same fields at byteOffset 24 as at byteOffset 0`, () => {
      const cluster0 = encodeHeaderCluster(spec);
      const expected = decodeHeaderFields(cluster0);
      for (const offset of [1, 3, 24, 4096 + 5]) {
        const shifted = atOffset(cluster0, offset);
        assert.equal(shifted.byteOffset, offset);
        assert.deepEqual(decodeHeaderFields(shifted), expected, `fields at byteOffset ${offset}`);
        const parsed = parseHeader(shifted);
        assert.deepEqual(parsed, parseHeader(cluster0), `parsed header at byteOffset ${offset}`);
      }
    });
  }

  test('a 112-byte probe view in the middle of junk decodes only its own bytes', () => {
    const cluster0 = encodeHeaderCluster(RAW_DATA_FILE_SPEC);
    const big = new Uint8Array(4096).fill(0xff);
    big.set(cluster0.subarray(0, 112), 24);
    const probe = new Uint8Array(big.buffer, 24, HEADER_PROBE_SIZE);
    const fields = decodeHeaderFields(probe);
    assert.equal(fields.size, 4 * MiB);
    assert.equal(fields.l1TableOffset, 0x30000);
    assert.equal(fields.incompatibleFeatures, INCOMPAT_DATA_FILE);
    assert.equal(fields.autoclearFeatures, AUTOCLEAR_DATA_FILE_RAW);
    assert.equal(fields.compressionType, 0);
  });

  test('a v3 header with header_length 104 leaves compression_type absent (0) even if byte 104 is set', () => {
    // byte 104 is the first byte of the extension area: 0xee000000 is an unknown type of length 0
    const cluster0 = craftCluster0({ fields: { headerLength: 104 }, patches: [{ at: 104, bytes: new Uint8Array([0xee]) }] });
    const fields = decodeHeaderFields(atOffset(cluster0, 24));
    assert.equal(fields.headerLength, 104);
    assert.equal(fields.compressionType, 0);
  });
});

describe('header refusals', () => {
  interface RefusalCase {
    name: string;
    craft: CraftOptions;
    code: ErrorCode;
    field: string | undefined;
    structure?: string;
    message?: RegExp;
    cls: abstract new (...args: never[]) => Error;
  }
  const cases: RefusalCase[] = [
    { name: 'bad magic', craft: { fields: { magic: 0x514649fa } }, code: 'QCOW_ERR_BAD_MAGIC', field: 'magic', cls: BadMagicError, message: /0x514649fa/ },
    { name: 'all-zero first cluster (a raw disk)', craft: { fields: { magic: 0, version: 0 } }, code: 'QCOW_ERR_BAD_MAGIC', field: 'magic', cls: BadMagicError },
    { name: 'qcow version 1', craft: { fields: { version: 1 } }, code: 'QCOW_ERR_UNSUPPORTED_VERSION', field: 'version', cls: UnsupportedVersionError },
    { name: 'version 4', craft: { fields: { version: 4 } }, code: 'QCOW_ERR_UNSUPPORTED_VERSION', field: 'version', cls: UnsupportedVersionError, message: /version 4/ },
    { name: 'cluster_bits 8 (256 B)', craft: { fields: { clusterBits: 8 }, length: 4096 }, code: 'QCOW_ERR_CORRUPT_IMAGE', field: 'cluster_bits', cls: CorruptImageError },
    { name: 'cluster_bits 22 (4 MiB)', craft: { fields: { clusterBits: 22 } }, code: 'QCOW_ERR_CORRUPT_IMAGE', field: 'cluster_bits', cls: CorruptImageError, message: /2\^22/ },
    { name: 'header_length 100 (below the v3 minimum of 104)', craft: { fields: { headerLength: 100 } }, code: 'QCOW_ERR_CORRUPT_IMAGE', field: 'header_length', cls: CorruptImageError },
    { name: 'header_length 108 (not a multiple of 8)', craft: { fields: { headerLength: 108 } }, code: 'QCOW_ERR_CORRUPT_IMAGE', field: 'header_length', cls: CorruptImageError },
    { name: 'header_length 0', craft: { fields: { headerLength: 0 } }, code: 'QCOW_ERR_CORRUPT_IMAGE', field: 'header_length', cls: CorruptImageError },
    { name: 'header_length 520 larger than the 512 B cluster', craft: { fields: { clusterBits: 9, headerLength: 520 } }, code: 'QCOW_ERR_CORRUPT_IMAGE', field: 'header_length', cls: CorruptImageError, message: /exceeds the cluster size 512/ },
    { name: 'refcount_order 7', craft: { fields: { refcountOrder: 7 } }, code: 'QCOW_ERR_CORRUPT_IMAGE', field: 'refcount_order', cls: CorruptImageError },
    {
      name: 'unknown incompatible bit 5',
      craft: { fields: { incompatibleFeatures: INCOMPAT_DATA_FILE | (1n << 5n) } },
      code: 'QCOW_ERR_UNSUPPORTED_FEATURE', field: 'incompatible_features', cls: UnsupportedFeatureError,
      message: /Unknown incompatible feature: 5/,
    },
    { name: 'crypt_method 1 (AES)', craft: { fields: { cryptMethod: 1 } }, code: 'QCOW_ERR_UNSUPPORTED_FEATURE', field: 'crypt_method', cls: UnsupportedFeatureError, message: /AES/ },
    { name: 'crypt_method 2 (LUKS)', craft: { fields: { cryptMethod: 2 } }, code: 'QCOW_ERR_UNSUPPORTED_FEATURE', field: 'crypt_method', cls: UnsupportedFeatureError, message: /LUKS/ },
    {
      name: 'full-disk-encryption header extension',
      craft: { extensions: [{ type: EXT_CRYPTO_HEADER, data: new Uint8Array(16) }] },
      code: 'QCOW_ERR_UNSUPPORTED_FEATURE', field: undefined, structure: 'header extension', cls: UnsupportedFeatureError,
    },
    {
      name: 'raw-external-data bit without the data-file bit',
      craft: { fields: { incompatibleFeatures: 0n, autoclearFeatures: AUTOCLEAR_DATA_FILE_RAW } },
      code: 'QCOW_ERR_CORRUPT_IMAGE', field: 'autoclear_features', cls: CorruptImageError,
    },
    {
      name: 'raw bit with the corrupt bit (bit 1, the spec typo) but not bit 2',
      craft: { fields: { incompatibleFeatures: 1n << 1n, autoclearFeatures: AUTOCLEAR_DATA_FILE_RAW } },
      code: 'QCOW_ERR_CORRUPT_IMAGE', field: 'autoclear_features', cls: CorruptImageError,
    },
    {
      name: 'compression_type zstd without the compression-type bit',
      craft: { fields: { compressionType: 1 } },
      code: 'QCOW_ERR_CORRUPT_IMAGE', field: 'compression_type', cls: CorruptImageError,
    },
    {
      name: 'compression-type bit with compression_type zlib',
      craft: { fields: { incompatibleFeatures: INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION } },
      code: 'QCOW_ERR_CORRUPT_IMAGE', field: 'compression_type', cls: CorruptImageError,
    },
    {
      name: 'compression-type bit with header_length 104 (compression_type absent = zlib)',
      craft: { fields: { incompatibleFeatures: INCOMPAT_COMPRESSION, headerLength: 104 } },
      code: 'QCOW_ERR_CORRUPT_IMAGE', field: 'compression_type', cls: CorruptImageError,
    },
    {
      name: 'unknown compression_type 2',
      craft: { fields: { incompatibleFeatures: INCOMPAT_COMPRESSION, compressionType: 2 } },
      code: 'QCOW_ERR_UNSUPPORTED_FEATURE', field: 'compression_type', cls: UnsupportedFeatureError,
    },
    {
      name: 'extended L2 with cluster_bits 13',
      craft: { fields: { clusterBits: 13, incompatibleFeatures: INCOMPAT_EXTL2 } },
      code: 'QCOW_ERR_CORRUPT_IMAGE', field: 'cluster_bits', cls: CorruptImageError,
    },
    {
      name: 'extended L2 with cluster_bits 9',
      craft: { fields: { clusterBits: 9, incompatibleFeatures: INCOMPAT_EXTL2 } },
      code: 'QCOW_ERR_CORRUPT_IMAGE', field: 'cluster_bits', cls: CorruptImageError,
    },
    {
      name: 'backing_file_offset beyond the 512 B cluster',
      craft: { fields: { clusterBits: 9, backingFileOffset: 600, backingFileSize: 4 } },
      code: 'QCOW_ERR_CORRUPT_IMAGE', field: 'backing_file_offset', cls: CorruptImageError,
    },
    {
      name: 'backing_file_offset inside the fixed header',
      craft: { fields: { backingFileOffset: 64, backingFileSize: 4 } },
      code: 'QCOW_ERR_CORRUPT_IMAGE', field: 'backing_file_offset', cls: CorruptImageError,
    },
    {
      name: 'backing file name of 1024 bytes',
      craft: { fields: { backingFileOffset: 1024, backingFileSize: 1024 } },
      code: 'QCOW_ERR_CORRUPT_IMAGE', field: 'backing_file_size', cls: CorruptImageError,
    },
    {
      name: 'backing file name running past the end of the cluster',
      craft: { fields: { clusterBits: 9, backingFileOffset: 500, backingFileSize: 13 } },
      code: 'QCOW_ERR_CORRUPT_IMAGE', field: 'backing_file_size', cls: CorruptImageError,
    },
    {
      name: 'backing format name of 16 bytes',
      craft: { extensions: [{ type: EXT_BACKING_FORMAT, data: ascii('f'.repeat(16)) }] },
      code: 'QCOW_ERR_CORRUPT_IMAGE', field: 'backing format', cls: CorruptImageError,
    },
  ];

  for (const c of cases) {
    test(`refuses ${c.name}`, () => {
      const cluster0 = craftCluster0(c.craft);
      const expected = { code: c.code, field: c.field, ...(c.message ? { message: c.message } : {}), ...(c.structure ? { structure: c.structure } : {}) };
      const err = assertQcowError(() => parseHeader(cluster0), expected);
      assert.ok(err instanceof c.cls, `${err.name} is a ${c.cls.name}`);
      // the same refusal at a non-zero byteOffset
      assertQcowError(() => parseHeader(atOffset(cluster0, 24)), expected);
    });
  }

  test('header_length 108 on a qemu image: refused, not parsed as a shifted extension list', () => {
    const cluster0 = encodeHeaderCluster(RAW_DATA_FILE_SPEC);
    new DataView(cluster0.buffer).setUint32(100, 108);
    assertQcowError(() => parseHeader(cluster0), { code: 'QCOW_ERR_CORRUPT_IMAGE', field: 'header_length' });
  });

  test('the header-length, magic and version refusals carry the structure and byte offset', () => {
    assertQcowError(() => parseHeader(craftCluster0({ fields: { magic: 1 } })), { code: 'QCOW_ERR_BAD_MAGIC', structure: 'header', field: 'magic', offset: 0 });
    assertQcowError(() => parseHeader(craftCluster0({ fields: { version: 1 } })), { code: 'QCOW_ERR_UNSUPPORTED_VERSION', structure: 'header', field: 'version', offset: 4 });
    assertQcowError(() => parseHeader(craftCluster0({ fields: { headerLength: 100 } })), { code: 'QCOW_ERR_CORRUPT_IMAGE', structure: 'header', field: 'header_length', offset: 100 });
    assertQcowError(() => parseHeader(craftCluster0({ fields: { clusterBits: 22 } })), { code: 'QCOW_ERR_CORRUPT_IMAGE', structure: 'header', field: 'cluster_bits', offset: 20 });
  });

  test('unknown incompatible bits: every one is listed in the error\'s features', () => {
    const err = assertQcowError(
      () => parseCrafted({ fields: { incompatibleFeatures: (1n << 5n) | (1n << 20n) | (1n << 63n) | INCOMPAT_DIRTY } }),
      { code: 'QCOW_ERR_UNSUPPORTED_FEATURE', field: 'incompatible_features', offset: 72, message: /^Unsupported qcow2 feature\(s\): / },
    );
    assert.ok(err instanceof UnsupportedFeatureError);
    assert.deepEqual(err.features, [
      'Unknown incompatible feature: 5',
      'Unknown incompatible feature: 20',
      'Unknown incompatible feature: 63',
    ]);
  });

  test('an unknown incompatible bit is named from the image\'s feature table when it has an entry', () => {
    const table = encodeFeatureTable([
      ...QEMU_FEATURE_TABLE,
      { kind: 'incompatible', bit: 5, name: 'quantum entanglement' },
      { kind: 'compatible', bit: 6, name: 'not this one' },
    ]);
    const err = assertQcowError(
      () => parseCrafted({
        fields: { incompatibleFeatures: INCOMPAT_DATA_FILE | (1n << 5n) | (1n << 6n) },
        extensions: [{ type: EXT_FEATURE_TABLE, data: table }],
      }),
      { code: 'QCOW_ERR_UNSUPPORTED_FEATURE', field: 'incompatible_features', message: /quantum entanglement/ },
    );
    assert.ok(err instanceof UnsupportedFeatureError);
    // bit 6 has only a *compatible* entry, which must not name the incompatible bit
    assert.deepEqual(err.features, ['quantum entanglement', 'Unknown incompatible feature: 6']);
  });

  test('unknown compatible and autoclear bits are accepted', () => {
    const h = parseCrafted({ fields: { compatibleFeatures: 0xfffen, autoclearFeatures: 1n << 5n } });
    assert.equal(h.compatibleFeatures, 0xfffen);
    assert.equal(h.autoclearFeatures, 1n << 5n);
  });

  test('known incompatible bits (dirty, corrupt, data file, zstd, extended L2) are accepted by the parser', () => {
    const h = parseCrafted({
      fields: { incompatibleFeatures: 0x1fn, compressionType: 1, clusterBits: 14 },
    });
    assert.equal(h.incompatibleFeatures, 0x1fn);
    assert.equal(h.compressionType, 1);
  });

  test('extended L2 at cluster_bits 14 is accepted', () => {
    const h = parseCrafted({ fields: { clusterBits: 14, incompatibleFeatures: INCOMPAT_EXTL2 } });
    assert.equal(h.clusterBits, 14);
  });

  test('crypt_method refusals name the feature "encryption"', () => {
    for (const cryptMethod of [1, 2, 3]) {
      const err = assertQcowError(() => parseCrafted({ fields: { cryptMethod } }), { code: 'QCOW_ERR_UNSUPPORTED_FEATURE', field: 'crypt_method', offset: 32 });
      assert.ok(err instanceof UnsupportedFeatureError);
      assert.deepEqual(err.features, ['encryption']);
    }
  });

  test('backing name of exactly 1023 bytes is accepted; the last byte of the cluster is usable', () => {
    const name = 'n'.repeat(1023);
    const h = parseCrafted({ fields: { backingFileOffset: 1024, backingFileSize: 1023 }, patches: [{ at: 1024, bytes: ascii(name) }] });
    assert.equal(h.backingFileName, name);
    const h512 = parseCrafted({
      fields: { clusterBits: 9, backingFileOffset: 500, backingFileSize: 12 },
      patches: [{ at: 500, bytes: ascii('twelve bytes') }],
    });
    assert.equal(h512.backingFileName, 'twelve bytes');
  });

  test('a backing format name of 15 bytes is accepted', () => {
    const h = parseCrafted({ extensions: [{ type: EXT_BACKING_FORMAT, data: ascii('f'.repeat(15)) }] });
    assert.equal(h.backingFormat, 'f'.repeat(15));
  });

  test('a file that ends inside the backing file name is an UnexpectedEofError', () => {
    const cluster0 = craftCluster0({ fields: { backingFileOffset: 1024, backingFileSize: 100 } });
    assertQcowError(() => parseHeader(cluster0.subarray(0, 1100)), { code: 'QCOW_ERR_UNEXPECTED_EOF' });
  });

  test('a buffer too short for any header is an UnexpectedEofError', () => {
    const cluster0 = encodeHeaderCluster(RAW_DATA_FILE_SPEC);
    for (const length of [0, 7]) {
      assertQcowError(() => decodeHeaderFields(cluster0.subarray(0, length)), { code: 'QCOW_ERR_UNEXPECTED_EOF', structure: 'header' });
    }
    assertQcowError(() => decodeHeaderFields(cluster0.subarray(0, 103)), { code: 'QCOW_ERR_UNEXPECTED_EOF' });
    assert.equal(decodeHeaderFields(cluster0.subarray(0, 104)).size, 4 * MiB);
    const v2 = craftCluster0({ fields: { version: 2 } });
    assertQcowError(() => decodeHeaderFields(v2.subarray(0, 71)), { code: 'QCOW_ERR_UNEXPECTED_EOF' });
    assert.equal(decodeHeaderFields(v2.subarray(0, 72)).version, 2);
  });
});

describe('64-bit header fields at or above 2^53', () => {
  const fields: [string, number][] = [
    ['backing_file_offset', 8],
    ['size', 24],
    ['l1_table_offset', 40],
    ['refcount_table_offset', 48],
    ['snapshots_offset', 64],
  ];
  for (const [field, at] of fields) {
    test(`${field} = 2^53 is refused with LimitExceededError naming the field`, () => {
      for (const value of [1n << 53n, (1n << 56n) - 1n, 0xffffffffffffffffn]) {
        const bytes = new Uint8Array(8);
        new DataView(bytes.buffer).setBigUint64(0, value);
        const cluster0 = craftCluster0({ patches: [{ at, bytes }] });
        const err = assertQcowError(() => decodeHeaderFields(cluster0), { code: 'QCOW_ERR_LIMIT_EXCEEDED', structure: 'header', field, offset: at });
        assert.ok(err instanceof LimitExceededError);
        assert.equal(err.limit, Number.MAX_SAFE_INTEGER);
        assertQcowError(() => parseHeader(atOffset(cluster0, 24)), { code: 'QCOW_ERR_LIMIT_EXCEEDED', field });
      }
    });
  }

  test('size = 2^53 − 1 decodes exactly', () => {
    const fields = decodeHeaderFields(craftCluster0({ fields: { size: Number.MAX_SAFE_INTEGER } }));
    assert.equal(fields.size, Number.MAX_SAFE_INTEGER);
  });

  test('the 64-bit feature words keep all 64 bits as bigints', () => {
    const fields = decodeHeaderFields(craftCluster0({
      fields: { incompatibleFeatures: 0xffffffffffffffffn, compatibleFeatures: 1n << 63n, autoclearFeatures: 0x8000000000000002n },
    }));
    assert.equal(fields.incompatibleFeatures, 0xffffffffffffffffn);
    assert.equal(fields.compatibleFeatures, 1n << 63n);
    assert.equal(fields.autoclearFeatures, 0x8000000000000002n);
  });
});

describe('header extensions', () => {
  test('an extension exactly filling the rest of the cluster is accepted; one byte more is "Header extension too large"', () => {
    const room = 512 - 112 - 8;
    const fits = parseCrafted({ fields: { clusterBits: 9 }, extensions: [{ type: 0x12345678, data: new Uint8Array(room).fill(7) }] });
    assert.equal(fits.extensions.length, 1);
    assert.equal(fits.extensions[0]?.data.length, room);
    const err = assertQcowError(
      () => parseCrafted({ fields: { clusterBits: 9 }, extensions: [{ type: 0x12345678, data: new Uint8Array(8), len: room + 1 }] }),
      { code: 'QCOW_ERR_CORRUPT_IMAGE', structure: 'header extension', field: undefined, offset: 112, message: /Header extension too large/ },
    );
    assert.ok(err instanceof CorruptImageError);
  });

  test('a length of 0xffffffff is "Header extension too large", not a wrap-around', () => {
    assertQcowError(
      () => parseCrafted({ extensions: [{ type: 0x12345678, data: new Uint8Array(8), len: 0xffffffff }] }),
      { code: 'QCOW_ERR_CORRUPT_IMAGE', structure: 'header extension', message: /Header extension too large/ },
    );
  });

  test('the second extension overrunning is reported at its own offset', () => {
    assertQcowError(
      () => parseCrafted({
        fields: { clusterBits: 9 },
        extensions: [
          { type: EXT_DATA_FILE, data: ascii('a.data') },
          { type: 0x11111111, data: new Uint8Array(8), len: 512 },
        ],
      }),
      { code: 'QCOW_ERR_CORRUPT_IMAGE', structure: 'header extension', offset: 128, message: /too large/ },
    );
  });

  test('with a backing file, extensions must end before backing_file_offset', () => {
    const withName = (len: number): CraftOptions => ({
      fields: { backingFileOffset: 160, backingFileSize: 4 },
      extensions: [{ type: 0x12345678, data: new Uint8Array(len), len }],
      patches: [{ at: 160, bytes: ascii('base') }],
    });
    const ok = parseCrafted(withName(40)); // 112 + 8 + 40 = 160
    assert.equal(ok.extensions[0]?.data.length, 40);
    assert.equal(ok.backingFileName, 'base');
    assertQcowError(() => parseCrafted(withName(41)), { code: 'QCOW_ERR_CORRUPT_IMAGE', structure: 'header extension', message: /too large/ });
  });

  test('an extension frame cut off by backing_file_offset is refused (qemu: "Header extension too large")', () => {
    assertQcowError(
      () => parseCrafted({ fields: { backingFileOffset: 116, backingFileSize: 4 } }),
      { code: 'QCOW_ERR_CORRUPT_IMAGE', structure: 'header extension', offset: 112 },
    );
  });

  test('no extension area at all when the backing name starts at header_length', () => {
    const h = parseCrafted({ fields: { backingFileOffset: 112, backingFileSize: 4 }, patches: [{ at: 112, bytes: ascii('base') }] });
    assert.deepEqual(h.extensions, []);
    assert.equal(h.backingFileName, 'base');
  });

  test('unknown extensions are kept verbatim, in file order, with padding skipped', () => {
    const a = new Uint8Array([1, 2, 3]);
    const b = new Uint8Array(16).fill(9);
    const h = parseCrafted({
      extensions: [
        { type: 0xaaaa0001, data: a },
        { type: EXT_DATA_FILE, data: ascii('disk.data') },
        { type: 0xaaaa0002, data: b },
        { type: 0xaaaa0003, data: new Uint8Array(0) },
      ],
    });
    assert.deepEqual(h.extensions.map((e) => e.type), [0xaaaa0001, EXT_DATA_FILE, 0xaaaa0002, 0xaaaa0003]);
    assert.deepEqual([...(h.extensions[0]?.data ?? [])], [1, 2, 3]);
    assert.deepEqual(h.extensions[2]?.data, b);
    assert.equal(h.extensions[3]?.data.length, 0);
    assert.equal(h.dataFileName, 'disk.data');
  });

  test('extensions stop at END: bytes after it are not parsed', () => {
    const cluster0 = craftCluster0({ extensions: [{ type: EXT_DATA_FILE, data: ascii('x') }] });
    // END at 128, then garbage claiming to be an extension
    new DataView(cluster0.buffer).setUint32(136, EXT_CRYPTO_HEADER);
    new DataView(cluster0.buffer).setUint32(140, 0xffffffff);
    const h = parseHeader(cluster0);
    assert.deepEqual(h.extensions.map((e) => e.type), [EXT_DATA_FILE]);
  });

  test('extensions start exactly at header_length (120 here), and bytes 112..120 are kept as unknown header bytes', () => {
    const h = parseCrafted({
      fields: { headerLength: 120 },
      patches: [{ at: 112, bytes: new Uint8Array([1, 2, 3, 4, 5, 6, 7, 8]) }],
      extensions: [{ type: EXT_DATA_FILE, data: ascii('at120.data') }],
    });
    assert.equal(h.headerLength, 120);
    assert.deepEqual([...h.unknownHeaderBytes], [1, 2, 3, 4, 5, 6, 7, 8]);
    assert.equal(h.dataFileName, 'at120.data');
  });

  test('header_length 104: extensions start at 104', () => {
    const h = parseCrafted({ fields: { headerLength: 104 }, extensions: [{ type: EXT_DATA_FILE, data: ascii('at104.data') }] });
    assert.equal(h.headerLength, 104);
    assert.equal(h.compressionType, 0);
    assert.equal(h.dataFileName, 'at104.data');
  });

  test('decodeExtensions with an area ending mid-frame is refused', () => {
    const cluster0 = craftCluster0({ extensions: [{ type: EXT_DATA_FILE, data: ascii('abc') }] });
    assertQcowError(() => decodeExtensions(cluster0, 112, 116), { code: 'QCOW_ERR_CORRUPT_IMAGE', structure: 'header extension', offset: 112 });
    assert.deepEqual(decodeExtensions(cluster0, 112, 112), []);
  });

  test('a feature table whose length is not a multiple of 48 ignores the trailing partial entry', () => {
    const table = encodeFeatureTable(QEMU_FEATURE_TABLE.slice(0, 2));
    const data = new Uint8Array(table.length + 20);
    data.set(table);
    const h = parseCrafted({ extensions: [{ type: EXT_FEATURE_TABLE, data }] });
    assert.deepEqual(h.featureNames, QEMU_FEATURE_TABLE.slice(0, 2));
  });
});

describe('version 2 headers', () => {
  test('a v2 header decodes with header_length 72, refcount_order 4 and every v3-only field absent', () => {
    // bytes 72..112 are non-zero: in a v2 image they are extensions, never v3 fields
    const cluster0 = craftCluster0({
      fields: { version: 2, incompatibleFeatures: 0n, refcountOrder: 0 },
      patches: [{ at: 72, bytes: new Uint8Array(40).fill(0xff) }],
    });
    const fields = decodeHeaderFields(atOffset(cluster0, 24));
    assert.equal(fields.version, 2);
    assert.equal(fields.headerLength, 72);
    assert.equal(fields.refcountOrder, 4);
    assert.equal(fields.incompatibleFeatures, 0n);
    assert.equal(fields.compatibleFeatures, 0n);
    assert.equal(fields.autoclearFeatures, 0n);
    assert.equal(fields.compressionType, 0);
    assert.equal(fields.size, 4 * MiB);
    assert.equal(fields.l1TableOffset, 0x30000);
  });

  test('a v2 header with nothing after byte 72 parses with no extensions', () => {
    const h = parseHeader(craftCluster0({ fields: { version: 2, incompatibleFeatures: 0n } }));
    assert.equal(h.version, 2);
    assert.equal(h.refcountOrder, 4);
    assert.deepEqual(h.extensions, []);
    assert.equal(h.unknownHeaderBytes.length, 0);
  });

  test('a qemu-made v2 image (compat=0.10, backing base.raw) gives its fixed fields and backing name', () => {
    const cluster0 = new Uint8Array(65536);
    cluster0.set(QEMU_V2_BACKING_HEADER);
    const h = parseHeader(cluster0);
    assert.equal(h.version, 2);
    assert.equal(h.size, 1 * MiB);
    assert.equal(h.clusterBits, 16);
    assert.equal(h.refcountOrder, 4);
    assert.equal(h.backingFileOffset, 0x60);
    assert.equal(h.backingFileName, 'base.raw');
  });

  test('a qemu-made v2 image: the backing-format extension at byte 72 is read, as qemu does', () => {
    const cluster0 = new Uint8Array(65536);
    cluster0.set(QEMU_V2_BACKING_HEADER);
    const h = parseHeader(cluster0);
    assert.deepEqual(h.extensions.map((e) => e.type), [EXT_BACKING_FORMAT]);
    assert.equal(h.backingFormat, 'raw');
  });
});

describe('QEMU_4M_FIELDS helper sanity', () => {
  test('craftCluster0 with the defaults equals encodeHeaderCluster without extensions, up to byte 112', () => {
    const crafted = craftCluster0();
    const encoded = encodeHeaderCluster({
      clusterBits: 16, size: 4 * MiB, l1Size: 1, l1TableOffset: 0x30000, refcountTableOffset: 0x10000, refcountTableClusters: 1,
      refcountOrder: 4, incompatibleFeatures: QEMU_4M_FIELDS.incompatibleFeatures, autoclearFeatures: QEMU_4M_FIELDS.autoclearFeatures,
    });
    assert.equal(toHex(crafted.subarray(0, 112)), toHex(encoded.subarray(0, 112)));
  });
});
