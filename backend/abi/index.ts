/** The virtio-rdma ABI: numbers, struct codecs, and the codec type. */
export * from './constants.js';
export * from './structs.js';
export { Struct, AbiError, type StructShape, type StructValue, type FieldType } from './struct.js';
