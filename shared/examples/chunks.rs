use asmn_shared::measure::*;
fn main() {
    let path = std::env::args().nth(1).expect("file");
    let algs = parse_algorithms(&std::env::args().nth(2).unwrap_or("crc32".into())).expect("algs");
    for cs in [128usize << 10, 256 << 10, 512 << 10, 1 << 20, 4 << 20] {
        for depth in [2usize, 4, 8] {
            let t = std::time::Instant::now();
            let m = measure_path(
                path.as_ref(),
                &algs,
                MeasureOptions {
                    chunk_size: cs,
                    queue_depth: depth,
                    workers: 0,
                },
                &mut |_| {},
            )
            .expect("m");
            println!(
                "chunk {:>5}K depth {depth}: {:.2} GB/s",
                cs >> 10,
                m.bytes as f64 / 1e9 / t.elapsed().as_secs_f64()
            );
        }
    }
}
