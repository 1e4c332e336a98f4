use kiln::graph::Graph;
use kiln::model::gguf::Gguf;
use kiln::reference::Reference;
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let g = Gguf::open(&args[1]).unwrap();
    let graph = Graph::load(&args[2]).unwrap();
    let b = graph.bind(&g).unwrap_or_else(|e| panic!("{e}"));
    println!(
        "nodes {} weights {} values {}",
        b.nodes.len(),
        b.weights.len(),
        b.values.len()
    );
    let ids: Vec<u32> = args[3].split(',').map(|s| s.parse().unwrap()).collect();
    let mut r = Reference::new(&b, &g, 512).unwrap();
    let t = std::time::Instant::now();
    let l = r.forward(&ids, false).unwrap();
    println!("time {:?}", t.elapsed());
    for row in 0..l.rows() {
        let x = l.row(row);
        let mut idx: Vec<usize> = (0..x.len()).collect();
        idx.sort_by(|&a, &b| x[b].partial_cmp(&x[a]).unwrap());
        println!(
            "{row}: {:?}",
            idx[..4].iter().map(|&i| (i, x[i])).collect::<Vec<_>>()
        );
    }
}
