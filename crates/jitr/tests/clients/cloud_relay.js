// A balena device's cloud-relay service reaching AWS IoT, as cloud-relay's AwsMessenger does:
// the same library (aws-iot-device-sdk 2.2.12), the same options from the same variables:
// AWS_CERT and AWS_PRIVATE_KEY base64-decoded to PEM buffers, client id RESIN_DEVICE_UUID,
// server CA file AWS_ROOT_CA_PATH, host AWS_DATA_ENDPOINT, relayed data published with QoS 0
// to CLOUD_CONSUMER_TOPIC (default "sensors"). The one test-only change: the port (AWS IoT's
// is 8883; the local endpoint listens on TEST_PORT).
//
// It publishes MESSAGE once connected, waits SETTLE_MS, and prints one JSON line per event
// (connect, close, offline, reconnect, error, published) and a last "result" line:
//   {"event":"result","connected":bool,"connects":n,"closes_after_publish":n}
// It exits after DEADLINE_MS in any case.
'use strict';
const awsIot = require('aws-iot-device-sdk');

const env = process.env;
const message = process.argv[2] || '{"relayed":true}';
const settleMs = Number(env.SETTLE_MS || 1500);
const deadlineMs = Number(env.DEADLINE_MS || 20000);
const topic = env.CLOUD_CONSUMER_TOPIC || 'sensors';
const started = Date.now();

function say(event, extra) {
  console.log(JSON.stringify(Object.assign({ event, at_ms: Date.now() - started }, extra)));
}

const device = awsIot.device({
  privateKey: Buffer.from(env.AWS_PRIVATE_KEY || '', 'base64'),
  clientCert: Buffer.from(env.AWS_CERT || '', 'base64'),
  caPath: env.AWS_ROOT_CA_PATH,
  clientId: env.RESIN_DEVICE_UUID,
  host: env.AWS_DATA_ENDPOINT,
  port: Number(env.TEST_PORT),
});

let connects = 0;
let published = false;
let closesAfterPublish = 0;

function finish() {
  say('result', { connected: connects > 0, connects, closes_after_publish: closesAfterPublish });
  device.end(true, () => process.exit(0));
  setTimeout(() => process.exit(0), 500).unref();
}

device.on('connect', () => {
  connects += 1;
  say('connect');
  if (published) return;
  published = true;
  device.publish(topic, Buffer.from(message), {}, (err) => {
    say('published', { topic, error: err ? String(err.message || err) : null });
  });
  setTimeout(finish, settleMs);
});
device.on('close', () => {
  if (published) closesAfterPublish += 1;
  say('close');
});
device.on('offline', () => say('offline'));
device.on('reconnect', () => say('reconnect'));
device.on('error', (e) => say('error', { message: String(e && e.message) }));
setTimeout(() => {
  say('deadline');
  finish();
}, deadlineMs);
