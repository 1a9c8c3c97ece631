/**
 * A declarative little-endian struct codec. Every ABI struct of
 * docs/virtio-rdma.md is one `Struct` definition, shared by the device and
 * the reference driver. Fields are laid out in order and must be naturally
 * aligned (checked when the module loads), so the same layout is a plain C
 * struct on the guest side with no packing attributes.
 */

export type FieldType = 'u8' | 'u16' | 'u32' | 'u64' | { bytes: number };
type FieldValue<T> = T extends 'u64' ? bigint : T extends { bytes: number } ? Uint8Array : number;
export type StructShape = readonly (readonly [string, FieldType])[];
export type StructValue<S extends StructShape> = { -readonly [F in S[number] as F[0]]: FieldValue<F[1]> };

const WIDTH = { u8: 1, u16: 2, u32: 4, u64: 8 } as const;

function widthOf(t: FieldType): number {
  return typeof t === 'string' ? WIDTH[t] : t.bytes;
}

export class AbiError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'AbiError';
  }
}

export class Struct<S extends StructShape> {
  readonly size: number;
  private readonly offsets: number[];
  private zeroValue: StructValue<S> | undefined;

  constructor(
    readonly name: string,
    readonly fields: S,
  ) {
    let off = 0;
    this.offsets = fields.map(([field, t]) => {
      const w = widthOf(t);
      const align = typeof t === 'string' ? w : 1;
      if (off % align !== 0) throw new AbiError(`${name}.${field} at offset ${off} is not ${align}-byte aligned`);
      const at = off;
      off += w;
      return at;
    });
    if (off % 4 !== 0 && off > 2) throw new AbiError(`${name} is ${off} bytes; pad it to a multiple of 4`);
    this.size = off;
  }

  offsetOf(field: S[number][0]): number {
    const i = this.fields.findIndex(([f]) => f === field);
    if (i < 0) throw new AbiError(`${this.name} has no field ${field}`);
    return this.offsets[i]!;
  }

  decode(dv: DataView, base = 0): StructValue<S> {
    if (base < 0 || base + this.size > dv.byteLength) throw new AbiError(`${this.name}: ${this.size} bytes at ${base} exceed ${dv.byteLength}`);
    const out: Record<string, number | bigint | Uint8Array> = {};
    this.fields.forEach(([field, t], i) => {
      const o = base + this.offsets[i]!;
      switch (t) {
        case 'u8':
          out[field] = dv.getUint8(o);
          break;
        case 'u16':
          out[field] = dv.getUint16(o, true);
          break;
        case 'u32':
          out[field] = dv.getUint32(o, true);
          break;
        case 'u64':
          out[field] = dv.getBigUint64(o, true);
          break;
        default:
          out[field] = new Uint8Array(dv.buffer.slice(dv.byteOffset + o, dv.byteOffset + o + t.bytes));
      }
    });
    return out as StructValue<S>;
  }

  encode(v: StructValue<S>, dv: DataView, base = 0): void {
    if (base < 0 || base + this.size > dv.byteLength) throw new AbiError(`${this.name}: ${this.size} bytes at ${base} exceed ${dv.byteLength}`);
    const rec = v as Record<string, number | bigint | Uint8Array>;
    this.fields.forEach(([field, t], i) => {
      const o = base + this.offsets[i]!;
      const x = rec[field];
      switch (t) {
        case 'u8':
          dv.setUint8(o, Number(x ?? 0));
          break;
        case 'u16':
          dv.setUint16(o, Number(x ?? 0), true);
          break;
        case 'u32':
          dv.setUint32(o, Number(x ?? 0) >>> 0, true);
          break;
        case 'u64':
          dv.setBigUint64(o, typeof x === 'bigint' ? x : BigInt(Number(x ?? 0)), true);
          break;
        default: {
          const src = x instanceof Uint8Array ? x : new Uint8Array(t.bytes);
          for (let k = 0; k < t.bytes; k++) dv.setUint8(o + k, src[k] ?? 0);
        }
      }
    });
  }

  decodeBytes(bytes: Uint8Array, base = 0): StructValue<S> {
    return this.decode(new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength), base);
  }

  encodeBytes(v: StructValue<S>): Uint8Array {
    const out = new Uint8Array(this.size);
    this.encode(v, new DataView(out.buffer));
    return out;
  }

  /**
   * A value with every field zero; convenient for building requests. The
   * device builds one per CQE, so the zero value is made once and copied
   * (byte fields get fresh arrays: callers may fill them in).
   */
  zero(): StructValue<S> {
    this.zeroValue ??= this.decode(new DataView(new ArrayBuffer(this.size)));
    const out: Record<string, unknown> = { ...this.zeroValue };
    for (const [field, t] of this.fields) if (typeof t !== 'string') out[field] = new Uint8Array(t.bytes);
    return out as StructValue<S>;
  }

}
