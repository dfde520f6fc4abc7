// Collects microphone samples (the AudioContext runs at 24 kHz) into 100 ms blocks.
class MicBlocks extends AudioWorkletProcessor {
  constructor() {
    super();
    this.block = new Float32Array(2400);
    this.n = 0;
  }
  process(inputs) {
    const ch = inputs[0] && inputs[0][0];
    if (ch) {
      for (let i = 0; i < ch.length; i++) {
        this.block[this.n++] = ch[i];
        if (this.n === this.block.length) {
          this.port.postMessage(this.block.slice(0));
          this.n = 0;
        }
      }
    }
    return true;
  }
}
registerProcessor("mic-blocks", MicBlocks);
