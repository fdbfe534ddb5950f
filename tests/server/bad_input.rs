//! Every kind of bad input gets a precise status and message, and the server keeps serving.

use tonic::Code;

use crate::common::*;
use slimserve::grpc::pb::slimserve::v1 as pb;

const M: &str = "bad";

async fn server() -> (TestServer, ClassifierClient<tonic::transport::Channel>) {
    let s = TestServer::start(&[M], |_| {}).await;
    let c = s.classifier().await;
    (s, c)
}

async fn expect(
    client: &mut ClassifierClient<tonic::transport::Channel>,
    req: pb::ClassifyRequest,
    code: Code,
    needles: &[&str],
) {
    let status = client
        .classify(req)
        .await
        .expect_err("bad input is refused");
    assert_status(&status, code, needles);
    assert_serving(client, M).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_bytes() {
    let (_s, mut c) = server().await;
    expect(
        &mut c,
        image_request(M, vec![]),
        Code::InvalidArgument,
        &["empty image data"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_that_are_not_an_image() {
    let (_s, mut c) = server().await;
    let req = image_request(M, b"hello, this is plain text, not a picture".to_vec());
    expect(
        &mut c,
        req,
        Code::InvalidArgument,
        &["not a supported image"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_jpeg() {
    let (_s, mut c) = server().await;
    let full = jpeg(64, 48);
    let req = image_request(M, full[..full.len() / 2].to_vec());
    expect(&mut c, req, Code::InvalidArgument, &["truncated JPEG"]).await;
    // The first 2 KB of a 512x512 photo: headers complete, the scan cut short. A lenient
    // decoder fills the missing rows and answers with confidence; this one refuses.
    let full = jpeg(512, 512);
    assert!(full.len() > 4096);
    let req = image_request(M, full[..2048].to_vec());
    expect(
        &mut c,
        req,
        Code::InvalidArgument,
        &["truncated JPEG", "after 2048 bytes", "EOI"],
    )
    .await;
    let req = image_request(M, full);
    assert!(c.classify(req).await.is_ok());
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    let mut chunk = kind.to_vec();
    chunk.extend_from_slice(data);
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(&chunk);
    out.extend_from_slice(&crc32(&chunk).to_be_bytes());
}

/// A PNG claiming `w` x `h` RGB pixels with a few bytes of pixel data: a server that
/// allocated before checking would need 2.7 GB for 30000x30000.
fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]); // 8-bit RGB, deflate, no filter, no interlace
    png_chunk(&mut out, b"IHDR", &ihdr);
    png_chunk(
        &mut out,
        b"IDAT",
        &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    );
    png_chunk(&mut out, b"IEND", &[]);
    out
}

/// A real JPEG whose frame header (SOF0) is patched to claim `w` x `h`.
fn jpeg_claiming(w: u16, h: u16) -> Vec<u8> {
    let mut bytes = jpeg(16, 16);
    let sof = bytes
        .windows(2)
        .position(|m| m == [0xff, 0xc0])
        .expect("baseline JPEG has SOF0");
    bytes[sof + 5..sof + 7].copy_from_slice(&h.to_be_bytes());
    bytes[sof + 7..sof + 9].copy_from_slice(&w.to_be_bytes());
    bytes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_claiming_30000x30000_is_refused_before_decoding() {
    let (_s, mut c) = server().await;
    let needles = ["30000x30000", "900000000 pixels", "over the limit"];
    expect(
        &mut c,
        image_request(M, png_claiming(30000, 30000)),
        Code::InvalidArgument,
        &needles,
    )
    .await;
    expect(
        &mut c,
        image_request(M, jpeg_claiming(30000, 30000)),
        Code::InvalidArgument,
        &needles,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tensor_with_wrong_byte_count() {
    let (_s, mut c) = server().await;
    let req = tensor_request(M, pb::DataType::Float32, &[3, 32, 32], vec![0; 100]);
    expect(
        &mut c,
        req,
        Code::InvalidArgument,
        &["100 bytes", "needs 12288"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tensor_with_wrong_shape() {
    let (_s, mut c) = server().await;
    let (_, data) = f32_input(1, 0);
    let req = tensor_request(M, pb::DataType::Float32, &[3, 64, 16], data);
    expect(
        &mut c,
        req,
        Code::InvalidArgument,
        &["shape [3, 64, 16]", "expects FP32 [3, 32, 32]"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tensor_with_wrong_datatype() {
    let (_s, mut c) = server().await;
    let (_, data) = f32_input(1, 0);
    let req = tensor_request(M, pb::DataType::Unspecified, &[3, 32, 32], data);
    expect(
        &mut c,
        req,
        Code::InvalidArgument,
        &["dtype DATA_TYPE_UNSPECIFIED is not supported"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nan_and_infinite_values() {
    let (_s, mut c) = server().await;
    for (bad, name) in [(f32::NAN, "NaN"), (f32::INFINITY, "inf")] {
        let (mut v, _) = f32_input(1, 0);
        v[17] = bad;
        let data = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        let req = tensor_request(M, pb::DataType::Float32, &[1, 3, 32, 32], data);
        expect(
            &mut c,
            req,
            Code::InvalidArgument,
            &[name, "element 17", "finite"],
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_model() {
    let (_s, mut c) = server().await;
    let req = image_request("no-such-model", png(8, 8));
    expect(
        &mut c,
        req,
        Code::NotFound,
        &["model `no-such-model` not found", "serves: bad"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_over_the_size_limit() {
    let s = TestServer::start(&[M], |c| c.max_message_bytes = 64 << 10).await;
    let mut c = s.classifier().await;
    let req = image_request(M, vec![7; 100 << 10]);
    let status = c.classify(req).await.expect_err("oversize is refused");
    assert_status(
        &status,
        Code::ResourceExhausted,
        &["limit of 65536 bytes", "--max-message-bytes"],
    );
    assert_serving(&mut c, M).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_k_out_of_range() {
    let (_s, mut c) = server().await;
    let mut req = image_request(M, png(16, 16));
    req.top_k = 99;
    expect(
        &mut c,
        req,
        Code::InvalidArgument,
        &["top_k 99 is out of range", "1..=4"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_input() {
    let (_s, mut c) = server().await;
    let req = pb::ClassifyRequest {
        model: M.into(),
        ..Default::default()
    };
    expect(&mut c, req, Code::InvalidArgument, &["no input"]).await;
}
